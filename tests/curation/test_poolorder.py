"""scale.poolorder numbers the pool by Ray tasks exactly as `rundir.unique_accepted` orders it.

A run of real photos (scikit-image) ingested from two roots, listed so that the ingest
partitions are NOT in source order: the same bytes under a name in each root (one uid, two
inputs), the earlier source in a later partition; an exact copy within one root; a corrupt
and an empty file (rejected). Each uid's first input by (source, partition, row) must win, and
the images must be numbered in that order, whatever the number of uid buckets and order ranges.
The calibration sample and the uid -> position joins are checked against the single process's.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from lvd.curation import copydetect as cd
from lvd.curation import rundir
from lvd.curation.scale import poolorder, shardindex
from lvd.curation.vectors import write_vectors

OPTS = {"num_cpus": 1, "max_retries": 0}
PHOTOS = ("astronaut", "camera", "coins", "chelsea", "coffee", "moon", "page", "text", "rocket", "horse")


def _jpeg(a: np.ndarray, q: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=q)
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    root = tmp_path_factory.mktemp("poolorder")
    late, early = root / "z_late", root / "a_early"  # listed late first: its partitions come first
    late.mkdir(), early.mkdir()
    for i, name in enumerate(PHOTOS):
        a = getattr(skimage.data, name)()
        (late / f"{name}.jpg").write_bytes(_jpeg(a, 90))
        if i % 2 == 0:  # the same bytes in the early root: one uid, its first input there
            (early / f"{name}.jpg").write_bytes(_jpeg(a, 90))
        else:
            (early / f"{name}_q60.jpg").write_bytes(_jpeg(a, 60))
    (late / "camera_again.jpg").write_bytes(_jpeg(skimage.data.camera(), 90))  # exact copy, same root
    (late / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (early / "empty.png").write_bytes(b"")
    run = root / "run"
    stages.run_ingest(stages.plan([str(late), str(early)], 4), run, IngestConfig())
    return run


def _order_table(work: Path, n: int, S: int) -> pa.Table:
    return pa.concat_tables([poolorder.nodes(work, r) for r in range(-(-n // S))])


@pytest.mark.parametrize("buckets,ranges,S", [(1, 1, 100), (3, 4, 3), (5, 7, 2)])
def test_positions_are_unique_accepteds_rows(ray_local, run, tmp_path, buckets, ranges, S):
    want = rundir.unique_accepted(run, ["uid", "width", "height"])
    rec = rundir.read_ingest(run, ["uid", "status", "source"]).to_pylist()
    uid_of = {Path(r["source"]).parent.name + "/" + Path(r["source"]).name: r["uid"] for r in rec}
    manifests = rundir.ingest_manifests(run)
    first_part = pq.read_table(manifests[0], columns=["source"])["source"].to_pylist()
    assert all("z_late" in s for s in first_part)  # partitions are not in source order
    assert uid_of["a_early/astronaut.jpg"] == uid_of["z_late/astronaut.jpg"]
    # the early root's 10 images come first: the shared bytes are numbered by their early input
    assert set(want["uid"].to_pylist()[:10]) == {
        uid_of[k] for k in uid_of if k.startswith("a_early/") and "empty" not in k
    }

    m, seed = 5, 3
    order = poolorder.number(run, tmp_path, S, OPTS, calib=(m, seed), buckets=buckets, ranges=ranges)
    got = _order_table(tmp_path, order.n, S)
    assert order.n == want.num_rows == len(PHOTOS) + len(PHOTOS) // 2  # camera twice, 5 same bytes
    assert got["pos"].to_pylist() == list(range(order.n))
    assert got["uid"].to_pylist() == want["uid"].to_pylist()
    w, h = (want[c].to_numpy().astype(np.int64) for c in ("width", "height"))
    assert got["pixels"].to_pylist() == (w * h).tolist()
    np.testing.assert_allclose(got["log_aspect"].to_numpy(), np.log(w / h))
    uids = want["uid"].to_pylist()
    assert order.sample == [uids[r] for r in cd.calibration_sample(uids, m, seed)]
    assert list(order.uids) == uids and order.uids[-1] == uids[-1] and order.uids.take([4, 0]) == [uids[4], uids[0]]


def test_joins_give_each_uid_its_position_and_minus_one_otherwise(ray_local, run, tmp_path):
    order = poolorder.number(run, tmp_path, 4, OPTS, buckets=3, ranges=2)
    uids = rundir.unique_accepted(run, ["uid"])["uid"].to_pylist()
    a = [uids[5], "nope", uids[0], uids[5]]
    b = [uids[2], uids[1], "missing", uids[-1]]
    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"x": a, "y": b}), f, row_group_size=3)
    files = [(str(f), ["x", "y"], 0), (str(f), ["x", "y"], 1), (str(f), ["y"], None)]
    poolorder.join(order, "t", files, OPTS)
    n = len(uids)
    assert poolorder.positions(tmp_path, "t", 0, 3, 2).tolist() == [[5, -1, 0], [2, 1, -1]]
    assert poolorder.positions(tmp_path, "t", 1, 1, 2).tolist() == [[5], [n - 1]]
    assert poolorder.positions(tmp_path, "t", 2, 4).tolist() == [[2, 1, -1, n - 1]]


class _Unread(poolorder.NodeUids):
    """NodeUids whose list the caller must not read: only the shards load their ranges."""

    def take(self, pos):
        raise AssertionError("the caller read the uid list")

    def __iter__(self):
        raise AssertionError("the caller read the uid list")


def test_a_sharded_index_over_node_uids_equals_one_over_the_list(ray_local, run, tmp_path):
    """A proposer's shards read the pool's uids from the node files (one range at a time; this
    process never reads the list): the same neighbour lists as the index built for the list."""
    order = poolorder.number(run, tmp_path / "order", 3, OPTS, buckets=2, ranges=3)
    uids = list(order.uids)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(uids), 16))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)
    perm = rng.permutation(len(uids))
    folder = tmp_path / "vecs"
    for p, rows in enumerate(np.array_split(perm, 3)):
        write_vectors(folder, p, [uids[i] for i in rows], vecs[rows])
    cfg = shardindex.ShardConfig(sharded_above=0, n_shards=2)
    with shardindex.build(folder, uids, cfg) as index:
        want = index.knn_lists(4)
    with shardindex.build(folder, _Unread(order.work, order.n, order.S), cfg) as index:
        got = index.knn_lists(4)
    assert got.shape == (len(uids), 4) and (got >= 0).all()
    np.testing.assert_array_equal(got, want)


def test_the_worker_budget_sizes_the_buckets_and_ranges(ray_local, run, tmp_path, monkeypatch):
    """Under `--worker-memory` a bucket or range task holds at most data_bytes / 620 B records
    (budget.order_records); the numbering does not change with the sizes."""
    from lvd.curation.scale import budget as B

    assert B.order_records(B.WorkerBudget(B.parse_bytes("3GiB"))) == (3 * 1024 - 256) * B.MiB // 2 // 620
    assert poolorder.tasks_for(10**7, B.order_records(B.WorkerBudget(B.parse_bytes("1GiB")))) == 16
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run).values())
    monkeypatch.setattr(B, "ORDER_RECORD_BYTES", B.WorkerBudget(B.parse_bytes("512MiB")).data_bytes // 4)
    with B.job_budget(B.WorkerBudget(B.parse_bytes("512MiB"))):
        order = poolorder.number(run, tmp_path, 4, OPTS)
    assert order.buckets == -(-records // 4) > 4
    assert list(order.uids) == rundir.unique_accepted(run, ["uid"])["uid"].to_pylist()


def test_ranges_cut_the_pool_evenly_by_weighted_samples():
    """Two partitions sampled at different rates (200 keys of 2,000 records, 200 of 8,000), the
    first's sources all before the second's: the 4 ranges hold 2,500 records each within 10%."""
    keys = {
        "a": pa.table({"source": [f"a/{i:06d}" for i in range(2000)], "part": [0] * 2000, "row": list(range(2000))}),
        "b": pa.table({"source": [f"b/{i:06d}" for i in range(8000)], "part": [1] * 8000, "row": list(range(8000))}),
    }
    sample = []
    for t in keys.values():
        take = np.linspace(0, t.num_rows - 1, 200).astype(np.int64)
        s = t.take(pa.array(take))
        sample.append(s.append_column("weight", pa.array(np.full(200, t.num_rows / 200))).cast(poolorder._SAMPLE))
    bounds = poolorder.cut(pa.concat_tables(sample), 4)
    j = poolorder.range_of(pa.concat_tables(list(keys.values())), bounds)
    counts = np.bincount(j, minlength=4)
    assert len(counts) == 4 and (np.abs(counts - 2500) <= 250).all(), counts
    assert (np.diff(j) >= 0).all()  # ranges follow the key order
