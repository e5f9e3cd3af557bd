"""The flow's count tables: the ingest counts read a partition at a time, equal to counting every record."""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

from lvd.curation import rundir
from lvd.flows import artifacts


def _jpeg(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_ingest_status_rows_count_each_partition_as_all_records(ray_local, tmp_path):
    """A real ingest run (photos, a duplicate, broken files across partitions) and manifests with
    null and empty reasons: the per-partition counts equal `status_reason_rows` over all records."""
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    src = tmp_path / "in"
    src.mkdir()
    for i, a in enumerate([skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]):
        (src / f"a{i}.jpg").write_bytes(_jpeg(a))
    (src / "b_dup.jpg").write_bytes(_jpeg(skimage.data.astronaut()))
    (src / "c_empty.png").write_bytes(b"")
    (src / "d_text.jpg").write_bytes(b"hello")
    (src / "e_cut.jpg").write_bytes(_jpeg(skimage.data.camera())[:300])
    run = tmp_path / "run"
    stages.run_ingest(stages.plan([str(src)], 2), run, IngestConfig())
    manifests = rundir.ingest_manifests(run)
    t = rundir.read_ingest(run, ["status", "reason"])
    want = artifacts.status_reason_rows(t["status"].to_pylist(), t["reason"].to_pylist())
    assert len(manifests) == 4 and len({r["status"] for r in want}) >= 2, want
    assert artifacts.ingest_status_rows(manifests) == want
    extra = tmp_path / "extra.parquet"  # reasons that are null and empty, and repeats
    pq.write_table(pa.table({"status": ["rejected", "accepted", "accepted", "rejected"],
                             "reason": ["", None, None, "corrupt"]}), extra)  # fmt: skip
    both = pa.concat_tables([t, pq.read_table(extra).cast(t.schema)])
    want = artifacts.status_reason_rows(both["status"].to_pylist(), both["reason"].to_pylist())
    assert artifacts.ingest_status_rows([*manifests, extra]) == want


def _old_montage(t, top, per):
    """The flow's summary before: a Python list of members per cluster."""
    from collections import defaultdict

    members = defaultdict(list)
    for u, c in zip(t["uid"].to_pylist(), t["leaf"].to_pylist()):
        members[c].append(u)
    shown = dict(sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top])
    return {c: us[:per] for c, us in shown.items()}, {c: len(us) for c, us in shown.items()}


def _old_pairs(sel, top, per):
    from collections import defaultdict

    pairs = defaultdict(list)
    for r in sel.to_pylist():
        if r["seed_uid"]:
            pairs[(r["seed_set"], r["seed_uid"])].append((r["uid"], r["similarity"]))
    return {k: v[:per] for k, v in sorted(pairs.items())[:top]}


def test_summaries_from_columns_equal_the_python_rows():
    """The cluster montage, the histogram and the retrieval pairs the flow reports, from Arrow
    and numpy columns: the same as the Python row-by-row summaries they replace (ties in
    cluster size broken by id, members in table order, empty and null seeds left out)."""
    import numpy as np

    from lvd.flows import curate_tasks as ct

    rng = np.random.default_rng(0)
    n, k = 500, 40
    uids = [f"{i:064x}" for i in rng.permutation(10 * n)[:n]]
    leaf = rng.integers(0, k - 3, n)  # clusters k-3.. stay empty; sizes tie
    t = pa.table({"uid": uids, "leaf": leaf})
    for top, per in ((6, 4), (50, 100)):
        assert ct.largest_clusters(t, top, per) == _old_montage(t, top, per)
    pick = rng.choice(n, 200, replace=False)
    seeds = rng.choice(["s1", "s2", "s10", "", None], 200).tolist()
    sel = pa.table({"uid": [uids[i] for i in pick], "seed_set": rng.choice(["b", "a"], 200).tolist(),
                    "seed_uid": seeds, "similarity": rng.random(200)})  # fmt: skip
    for top, per in ((3, 2), (50, 500)):
        assert ct.seed_pairs(sel, top, per) == _old_pairs(sel, top, per)
    before, after = ct.cluster_sizes_selected(t, sel, k)
    lookup = dict(zip(uids, leaf.tolist()))
    assert np.array_equal(before, np.bincount(leaf, minlength=k))
    assert np.array_equal(after, np.bincount([lookup[u] for u in sel["uid"].to_pylist()], minlength=k))
    assert ct.value_counts(sel["seed_set"]) == Counter(sel["seed_set"].to_pylist())


def test_dedup_groups_and_shard_totals_from_columns_equal_the_python_rows():
    """The dedup gallery's groups and the shard counts, from Arrow columns: the same as the
    Python dicts they replace (group ties broken by representative, rows in table order)."""
    import numpy as np

    from lvd.flows import curate_tasks as ct

    rng = np.random.default_rng(1)
    reps = [f"r{i:03d}" for i in range(30)]
    n = 300
    dups = pa.table({"uid": [f"u{i:04d}" for i in rng.permutation(n)], "duplicate_of": rng.choice(reps, n).tolist(),
                     "method": rng.choice(["exact", "phash", "copy"], n).tolist(), "distance": rng.random(n)})  # fmt: skip
    d = dups.to_pydict()
    groups: dict[str, list] = {}
    for uid, kept, method, dist in zip(d["uid"], d["duplicate_of"], d["method"], d["distance"]):
        groups.setdefault(kept, []).append((uid, method, float(dist)))
    for top, per in ((4, 3), (100, 1000)):
        want = [(k, v[:per]) for k, v in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))[:top]]
        assert ct.largest_groups(dups, top, per) == want
    shard = np.repeat([f"shard-{i:06d}.tar" for i in range(7)], rng.integers(1, 40, 7))
    size = {s: int(rng.integers(1000, 10**9)) for s in set(shard.tolist())}
    m = pa.table({"shard": shard.tolist(), "shard_bytes": [size[s] for s in shard.tolist()]})
    md = m.to_pydict()
    want = (len(md["shard"]), len(set(md["shard"])), int(sum(dict(zip(md["shard"], md["shard_bytes"])).values())))
    assert ct.shard_totals(m) == want
    assert ct.shard_totals(m.slice(0, 0)) == (0, 0, 0)
