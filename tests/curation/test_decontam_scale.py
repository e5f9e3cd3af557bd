"""Partitioned decontamination (stages.decontam `_run_partitioned`) gives the single task's
decontaminated.parquet byte for byte, on the session's Ray and on a 3-node
`ray.cluster_utils.Cluster`; the mass-removal guard trips with the same message before anything
is written.

The pool is built so that the partitioned path's global steps matter: 7 real photos and their
copies in partitions of 6 files; a photo's pixels saved twice as PNG (two uids, identical
features: a tie in every k-NN list and in every verification score, between partitions); the
partitions of the second input come first while its sources sort last (pool order is source
order, not partition order); an exact copy of a file in two partitions (one uid, two records);
k = 2, so each eval image's top k is a choice among partitions; given vectors as an embedder
proposer. Two eval sets hold resized copies of three photos; a third holds a soft LFW face
(120 px) whose copies in the pool (the same file, JPEG q20, brightened) only the hash dedup's
rules link, beside look-alike faces (test_decontam_hash.py tests that decision alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _images import face_copies, lfw, png
from PIL import Image

from lvd.curation import copies, rundir
from lvd.curation.copydetect import METHOD_MODEL, CopyDetectConfig
from lvd.curation.dedup import DUPLICATES_SCHEMA, DedupConfig
from lvd.curation.guard import MassRemovalError
from lvd.curation.ingest import IngestConfig
from lvd.curation.runner import RunnerConfig
from lvd.curation.stages import copy as stages_copy
from lvd.curation.stages import decontam
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.urlfilter import CAP_SCHEMA
from lvd.curation.vectors import write_vectors

COPY_KW = dict(k=2, max_remove=0.95, calib_images=12, calib_copy_images=6)  # a small calibration: fast
COPY = CopyDetectConfig(**COPY_KW)
EVAL_PHOTOS = {"set_a": (0, 2), "set_b": (0, 4)}  # photo 0 twice: its copies match two eval images
FACE, LOOKALIKES = 166, (10, 11, 101, 103)  # LFW rows: the eval patch (0-4 ORB inliers to its copies), distinct ones


def _png(img: Image.Image, level: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _write_inputs(root: Path) -> tuple[list[Path], dict[str, Path]]:
    photos = copies.real_photos()[:7]
    a, z, ev = root / "a_first", root / "z_second", root / "evals"
    for d in (a, z):
        d.mkdir(parents=True)
    for i, (name, img) in enumerate(photos):
        home = a if i % 2 else z
        (home / f"{name}.jpg").write_bytes(copies.encode_original(img))
        for kind, blob in copies.make_copies(img, seed=i).items():
            if kind not in ("exact", "resized"):
                (home / f"{name}__{kind}.img").write_bytes(blob)
    # the same pixels twice (PNG at two compression levels: two uids), one in each input
    name, img = photos[0]
    (a / f"{name}__png1.png").write_bytes(_png(img, 1))
    (z / f"{name}__png9.png").write_bytes(_png(img, 9))
    # one file's bytes in both inputs: one uid, two records
    shutil.copy(z / f"{name}.jpg", a / f"{name}__again.jpg")
    evals = {}
    for set_name, which in EVAL_PHOTOS.items():
        d = ev / set_name
        d.mkdir(parents=True)
        for i in which:
            blob = copies.make_copies(photos[i][1], seed=100 + i + len(evals))["resized"]
            (d / f"{photos[i][0]}.jpg").write_bytes(blob)
        evals[set_name] = d
    for i, (kind, blob) in enumerate(face_copies(lfw(FACE)).items()):  # spread over both inputs
        ((a, z)[i % 2] / f"face{FACE}__{kind}.{'png' if kind == 'same' else 'jpg'}").write_bytes(blob)
    for i in LOOKALIKES:
        ((a, z)[i % 2] / f"face{i}.png").write_bytes(png(lfw(i)))
    (ev / "set_faces").mkdir()
    (ev / "set_faces" / f"face{FACE}.png").write_bytes(png(lfw(FACE)))
    evals["set_faces"] = ev / "set_faces"
    return [z, a], evals  # z's partitions first, a's sources sort first


def _given_vectors(run: Path, seed: int = 0, folder: str = "vectors") -> None:
    """A proposer's vectors per ingest partition (what `lvd curate --vectors` imports): each
    image's vector is its descriptor's, projected and a little noisy."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(7).standard_normal((144, 32)).astype(np.float32)
    feats = {}
    for p in sorted(rundir.stage_dir(run, "copyfeat").glob("part-*.parquet")):
        for r in pq.read_table(p, columns=["uid", "glob"]).to_pylist():
            feats.setdefault(r["uid"], np.frombuffer(r["glob"], np.float32))
    for index, m in sorted(rundir.ingest_markers(run).items()):
        t = pq.read_table(run / "ingest" / m["outputs"]["main"], columns=["uid", "status"])
        uids = sorted({u for u, s in zip(t["uid"].to_pylist(), t["status"].to_pylist()) if s == "accepted"})
        if not uids:
            continue
        v = np.stack([feats[u] @ proj for u in uids]) + 0.05 * rng.standard_normal((len(uids), 32))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        write_vectors(run / folder, index, uids, v.astype(np.float16))


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("decontam_scale")
    inputs, eval_inputs = _write_inputs(root / "in")
    run = root / "run"
    stages.run_ingest(stages.plan([str(p) for p in inputs], 6), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())
    stages_copy.run_copyfeat(run)
    stages_copy.run_copydetect(run, COPY)
    _given_vectors(run)
    evals = {}
    for name, d in eval_inputs.items():
        ev = rundir.sub_run(run, "eval", name)
        stages.run_ingest(stages.plan([str(d)], 6), ev, IngestConfig())
        stages_copy.run_copyfeat(ev)
        _given_vectors(ev, seed=1)
        evals[name] = ev
    return run, evals


def _decontam(run: Path, evals: dict, partitioned: bool, *, cfg=COPY, proposer="vectors", buckets=None) -> dict:
    """Run the stage afresh; -> {file name: bytes} of RUN/decontam (scratch must be gone)."""
    shutil.rmtree(run / "decontam", ignore_errors=True)
    decontam.run_decontam(run, evals, cfg, proposer=proposer, partitioned=partitioned, buckets=buckets)
    return {p.name: p.read_bytes() for p in sorted((run / "decontam").iterdir())}


@pytest.mark.parametrize("proposer", [None, "vectors"])
def test_partitioned_equals_one_task_byte_for_byte(runs, proposer):
    run, evals = runs
    one = _decontam(run, evals, False, proposer=proposer)
    parts = _decontam(run, evals, True, proposer=proposer, buckets=3)
    assert set(one) == {"decontaminated.parquet", "decontaminated.done.json"}
    assert parts == one
    t = pq.read_table(io.BytesIO(one["decontaminated.parquet"]))
    assert t.num_rows >= 6 and set(t["eval_set"].to_pylist()) == {"set_a", "set_b", "set_faces"}, t.to_pylist()


def test_soft_face_family_removed_by_the_hash_rules_lookalikes_kept(runs):
    """The eval face's copies (the same file, JPEG q20, brightened) are removed, decided by the
    hash dedup's rules (method phash, similarity 1.0) although local features cannot link them;
    the look-alike faces stay. Both paths (the byte equality above covers them)."""
    run, evals = runs
    one = pq.read_table(io.BytesIO(_decontam(run, evals, False)["decontaminated.parquet"]))
    src = rundir.read_ingest(run, ["uid", "source"])
    name = {u: Path(s).name for u, s in zip(src["uid"].to_pylist(), src["source"].to_pylist())}
    removed = {
        name[u]: (m, sim, e)
        for u, m, sim, e in zip(*[one[c].to_pylist() for c in ("uid", "method", "similarity", "eval_set")])
    }
    family = {f"face{FACE}__same.png", f"face{FACE}__q20.jpg", f"face{FACE}__bright.jpg"}
    for f in family:
        assert removed.get(f) == ("phash", 1.0, "set_faces"), (f, removed.get(f))
    assert not {f"face{i}.png" for i in LOOKALIKES} & set(removed), removed
    # without the hash decision local features decide: they do not link the soft face's copies
    pool = stages_copy.read_features(run)
    ev = stages_copy.read_features(evals["set_faces"])
    decider = stages_copy.Decider(ev.feats + pool.feats, None, stages_copy.calibration(run), COPY)
    rows = [i for i, u in enumerate(pool.uids.tolist()) if name[u] in family]
    scores = decider.scores(np.zeros(len(rows), np.int64), np.array(rows) + 1)
    assert not decider.links(scores).any(), scores


def test_the_pool_spans_partitions_with_ties(runs):
    """The fixture exercises what it claims: several parts, source order != partition order,
    a uid recorded in two partitions, and two uids with identical features."""
    run, _ = runs
    assert len(list((run / "copyfeat").glob("part-*.parquet"))) >= 5
    t = rundir.read_ingest(run, ["uid", "source", "status"]).to_pylist()
    again = [r["uid"] for r in t if r["source"].endswith("__again.jpg")]
    assert len(again) == 1 and sum(r["uid"] == again[0] for r in t) == 2
    pool = stages_copy.read_features(run)
    png = [i for i, u in enumerate(pool.uids) if any(r["uid"] == u and "__png" in r["source"] for r in t)]
    assert len(png) == 2 and np.array_equal(pool.glob[png[0]], pool.glob[png[1]])


def _cap(run: Path, endings: tuple[str, ...]) -> None:
    """A domain cap (as `lvd curate --max-per-domain` writes it) on the records whose source ends so."""
    t = rundir.read_ingest(run, ["uid", "source", "status"]).to_pylist()
    cap = [r for r in t if r["source"].endswith(endings) and r["status"] == "accepted"]
    rows = {"source": [r["source"] for r in cap], "uid": [r["uid"] for r in cap], "rule": ["test"] * len(cap)}
    rundir.cap_path(run).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=CAP_SCHEMA), rundir.cap_path(run))


def test_capped_after_copy_detection_equal(runs, tmp_path):
    """Images capped after copy detection are still in its groups but no longer in the pool:
    both paths leave them out (the partitioned one looks group members up in its pool index)."""
    run, evals = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("decontam"))
    _cap(copy, ("__cropped.img", "__again.jpg"))
    copy_evals = {k: rundir.sub_run(copy, "eval", k) for k in evals}
    one = _decontam(copy, copy_evals, False)
    assert _decontam(copy, copy_evals, True, buckets=2) == one
    capped = set(pq.read_table(rundir.cap_path(copy))["uid"].to_pylist())
    dups = set(pq.read_table(copy / "copydetect" / "duplicates.parquet")["uid"].to_pylist())
    removed = set(pq.read_table(io.BytesIO(one["decontaminated.parquet"]))["uid"].to_pylist())
    gone = capped - set(stages_copy.read_features(copy).uids.tolist())
    assert gone & dups and not gone & removed  # in the groups, out of the pool, not removed


@pytest.mark.parametrize("capped", [False, True])
def test_pool_index_is_the_single_pool_in_its_order(runs, tmp_path, capped):
    """Wave 0 gives `read_features`'s pool (unique accepted uids, caps applied) and its order
    (source order, across parts): capped, the uid recorded twice keeps its other record's
    place, and an image whose one record is capped leaves the pool."""
    run, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("decontam", "eval"))
    if capped:
        _cap(copy, ("__again.jpg", "__cropped.img"))
    job = decontam.PartJob(str(copy), str(tmp_path / "work"), COPY, (), None)
    n, homes = decontam._pool_index(job, RunnerConfig(), 3)
    keys = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "work" / "pool").glob("*.parquet"))])
    want = stages_copy.read_features(copy).uids.tolist()
    assert n == len(want) and homes == sorted(set(keys["home"].to_pylist()))
    assert keys.sort_by(decontam._ORDER)["uid"].to_pylist() == want
    assert keys.sort_by([("home", "ascending"), *decontam._ORDER])["uid"].to_pylist() != want  # order spans parts
    # a part's task sees its members in pool order (its search's ties go to the lower pool row), same features
    pool = stages_copy.read_features(copy)
    home_of = dict(zip(keys["uid"].to_pylist(), keys["home"].to_pylist()))
    for h in homes:
        part = decontam._load_part(job, h)
        rows = [i for i, u in enumerate(want) if home_of[u] == h]
        assert part.feats.uids.tolist() == [want[i] for i in rows]
        assert np.array_equal(part.feats.glob, pool.glob[rows]) and np.array_equal(part.feats.nhash, pool.nhash[rows])
    if capped:
        assert len(want) < len(stages_copy.read_features(run).uids)


def test_group_expansion_equals_the_single_pass_on_ties(runs, tmp_path):
    """`_groups_of` (matches joined with the duplicate groups read in batches) against
    `_with_components` (the single task's pass over the pool) on designed cases: two members of
    one group tied on score with different eval images (the first in pool order names the
    group), a member that is not in the pool, a representative that is itself someone's
    duplicate (not in its own group), a matched image whose own match beats its group's."""
    run, _ = runs
    cal = stages_copy.calibration(run)
    uids = [f"u{i}" for i in range(10)]  # pool order
    dups = {"u2": "u1", "u3": "u1", "u6": "u5", "x": "u5", "u8": "u7", "u7": "u9", "u4": "u0"}
    best = {3: (20.0, 0), 2: (20.0, 1), 6: (9.0, 2), 8: (7.0, 1), 4: (12.0, 2), 0: (30.0, 1)}
    eval_uids = np.array(["e0", "e1", "e2"], dtype=object)
    set_of = {"e0": "a", "e1": "a", "e2": "b"}
    table = pa.table(
        {
            "uid": list(dups),
            "duplicate_of": list(dups.values()),
            "method": ["copy"] * len(dups),
            "distance": [0.1] * len(dups),
        },
        schema=DUPLICATES_SCHEMA,
    )
    decider = stages_copy.Decider([], None, cal, COPY)
    want = decontam._with_components(np.array(uids, dtype=object), best, table, eval_uids, set_of, decider)
    (tmp_path / "run" / "copydetect").mkdir(parents=True)
    pq.write_table(table, tmp_path / "run" / "copydetect" / "duplicates.parquet", row_group_size=2)
    index = {"uid": uids, "source": [f"s{i}" for i in range(10)], "part": [0] * 10, "row": list(range(10))}
    (tmp_path / "work" / "pool").mkdir(parents=True)
    pq.write_table(
        pa.table({**index, "home": [0] * 10}, schema=decontam.INDEX_SCHEMA), tmp_path / "work" / "pool" / "b0.parquet"
    )
    m = pa.table(
        {
            **{k: [v[r] for r in sorted(best)] for k, v in index.items()},
            "score": [best[r][0] for r in sorted(best)],
            "q": [best[r][1] for r in sorted(best)],
            "first_q": [best[r][1] for r in sorted(best)],
        },
        schema=decontam.MATCH_SCHEMA,
    ).take([3, 0, 5, 1, 2, 4])  # the parts' order is not the pool's
    job = decontam.PartJob(str(tmp_path / "run"), str(tmp_path / "work"), COPY, (), None, cal)
    feats = stages_copy.PoolFeatures(eval_uids, *[None] * 6)
    got = decontam._groups_of(job, m, decontam.EvalSide(feats, set_of, [], None), decider, rows=3)
    assert got.equals(want), (got.to_pylist(), want.to_pylist())
    assert dict(zip(want["uid"].to_pylist(), want["matched_eval_uid"].to_pylist()))["u1"] == "e1"  # the tie
    assert "x" not in want["uid"].to_pylist() and "u7" not in want["uid"].to_pylist()  # u7 is in u9's group


def test_copy_model_vectors_decide_equal(runs, tmp_path):
    """With a copy model (its vectors given here, as a model would write them to RUN/copyvec, and
    a cosine calibration), both paths search and decide by those vectors, with equal output."""
    run, evals = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("decontam"))
    copy_evals = {k: rundir.sub_run(copy, "eval", k) for k in evals}
    for d, seed in [(copy, 0), *[(e, 1) for e in copy_evals.values()]]:
        _given_vectors(d, seed, folder="copyvec")
    cal = {**stages_copy.calibration(copy).as_dict(), "method": METHOD_MODEL, "threshold": 0.97}
    path = copy / "copydetect" / "duplicates.calibration.parquet"
    pq.write_table(pa.table({"json": [json.dumps(cal, sort_keys=True)]}), path)
    kw = dict(proposer=None, copy_model=("given-vectors", {}))
    shutil.rmtree(copy / "decontam", ignore_errors=True)
    decontam.run_decontam(copy, copy_evals, COPY, partitioned=False, **kw)
    one = {p.name: p.read_bytes() for p in sorted((copy / "decontam").iterdir())}
    shutil.rmtree(copy / "decontam")
    decontam.run_decontam(copy, copy_evals, COPY, partitioned=True, buckets=2, **kw)
    assert {p.name: p.read_bytes() for p in sorted((copy / "decontam").iterdir())} == one
    t = pq.read_table(io.BytesIO(one["decontaminated.parquet"]))
    assert t.num_rows >= 3 and set(t["method"].to_pylist()) == {METHOD_MODEL, "phash"}, t.to_pylist()


def test_path_chosen_by_pool_size(runs, monkeypatch):
    run, _ = runs
    assert not decontam.partitions(run)
    assert decontam.partitions(run, True) and not decontam.partitions(run, False)
    monkeypatch.setattr(decontam, "PARTITIONED_MIN_RECORDS", 10)
    assert decontam.partitions(run)


def test_guard_trips_with_the_same_message_and_writes_nothing(runs):
    run, evals = runs
    strict = dataclasses.replace(COPY, max_remove=0.05)
    messages = []
    for partitioned in (False, True):
        shutil.rmtree(run / "decontam", ignore_errors=True)
        with pytest.raises(MassRemovalError) as e:
            decontam.run_decontam(run, evals, strict, partitioned=partitioned)
        err = e.value  # a RayTaskError that is also a MassRemovalError (str: Ray's traceback, then the message)
        messages.append(
            (err.stage, err.removed, err.total, err.limit, err.detail, err.largest, str(err).split("\n")[-1])
        )
        assert not (run / "decontam" / "decontaminated.parquet").exists()
        assert not (run / "decontam" / "decontaminated.done.json").exists()
    assert messages[0] == messages[1]
    assert "decontamination would remove" in messages[0][-1] and messages[0][5][0], messages[0]


CLUSTER_SCRIPT = """
import json, shutil, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from lvd.curation.copydetect import METHOD_MODEL, CopyDetectConfig
from lvd.curation.stages import decontam

run, evals, kw = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
try:
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    shutil.rmtree(run / "decontam", ignore_errors=True)
    evals = {k: Path(v) for k, v in evals.items()}
    decontam.run_decontam(run, evals, CopyDetectConfig(**kw), proposer="vectors", partitioned=True, buckets=3)
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    out = {p.name: p.read_bytes().hex() for p in sorted((run / "decontam").iterdir())}
    print("RESULT " + json.dumps({"nodes": nodes, "files": out}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_partitioned_on_a_three_node_cluster_equals_one_task(runs, tmp_path):
    run, evals = runs
    one = _decontam(run, evals, False)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("decontam"))
    copy_evals = {k: rundir.sub_run(copy, "eval", k) for k in evals}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-c", CLUSTER_SCRIPT, str(copy), json.dumps({k: str(v) for k, v in copy_evals.items()})]
    argv.append(json.dumps(COPY_KW))
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["nodes"] == 4
    files = {k: bytes.fromhex(v) for k, v in got["files"].items()}
    assert files["decontaminated.parquet"] == one["decontaminated.parquet"]
    # the marker names the same input and config and the same output bytes (its paths are the copy's)
    assert (
        hashlib.sha256(files["decontaminated.parquet"]).hexdigest()
        == json.loads(one["decontaminated.done.json"])["files"]["decontaminated.parquet"]["sha256"]
    )
