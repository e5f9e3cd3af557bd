"""Distributed spherical k-means (lvd.curation.scale.dkmeans) against the single-process Lloyd
(lvd.curation.lloyd): the same centroids and labels bit for bit from the same seed, on the
session's Ray and on a 3-node `ray.cluster_utils.Cluster` (in a subprocess, since the session's
Ray is already initialised in this process)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvd.curation import rundir, testdata
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.lloyd import LloydConfig, lloyd
from lvd.curation.scale import budget as B
from lvd.curation.scale import pcluster, pretrieve, pseeds
from lvd.curation.scale.dkmeans import DKMeansConfig, cluster_vector_folder, dkmeans, folder_parts, plan_shards
from lvd.curation.stages import ingest_dedup
from lvd.curation.stages import retrieve as stages_retrieve
from lvd.curation.stages import select as stages_select
from lvd.curation.vectors import open_vectors, write_vectors

PART_SIZES = (700, 0, 1300, 1000)  # uneven, one part empty: shards cut across parts


def blobs16(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    x = centres[rng.integers(0, k, n)] / np.sqrt(d) * 3 + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_folder(folder, x16: np.ndarray) -> None:
    start = 0
    for i, size in enumerate(PART_SIZES):
        write_vectors(folder, i, [f"u{r:05d}" for r in range(start, start + size)], x16[start : start + size])
        start += size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vectors")
    x16 = blobs16(sum(PART_SIZES), 16, 12, seed=0)
    write_folder(path, x16)
    return path, x16


LCFG = LloydConfig(k=12, niter=8, seed=3, block_rows=128)


def assert_same(got, want) -> None:
    np.testing.assert_array_equal(got.centroids_KD, want.centroids_KD)
    np.testing.assert_array_equal(got.assign_N, want.assign_N)
    np.testing.assert_array_equal(got.score_N, want.score_N)
    np.testing.assert_array_equal(got.sizes_K, np.bincount(want.assign_N, minlength=len(want.centroids_KD)))
    assert got.inertia == pytest.approx(want.inertia, rel=1e-12)


def test_distributed_equals_single_process_from_the_same_seed(ray_local, folder):
    path, x16 = folder
    want = lloyd(x16, LCFG)
    for n_actors in (1, 2):
        got = dkmeans(path, DKMeansConfig(lloyd=LCFG, n_actors=n_actors))
        assert_same(got, want)
        assert [a.rows for a in got.actors] == ([3000] if n_actors == 1 else [1536, 1464])
    # the labels are a real clustering: unit centroids, every row on its most similar one
    np.testing.assert_allclose(np.linalg.norm(want.centroids_KD, axis=1), 1.0, atol=1e-6)
    sims = x16.astype(np.float32) @ want.centroids_KD.T
    np.testing.assert_array_equal(want.assign_N, sims.argmax(axis=1))
    # each centroid is the normalised sum of its members under the previous step's labels: one
    # more step from the result moves nothing on well-separated blobs
    again = lloyd(x16, LloydConfig(k=12, niter=1, block_rows=128), init_KD=want.centroids_KD)
    np.testing.assert_allclose(again.centroids_KD, want.centroids_KD, atol=2e-3)


def test_a_small_budget_gives_more_actors_each_within_it_and_the_same_result(ray_local, folder):
    """Under a worker budget the actor count follows from it (whole blocks of at most
    `budget.kmeans_shard_rows` rows each), and each actor holds the Ray memory its shard needs."""
    path, x16 = folder
    small = B.WorkerBudget(256 * B.KiB, base_bytes=128 * B.KiB)  # a 64 KiB data share
    got = dkmeans(path, DKMeansConfig(lloyd=LCFG, n_actors=1, actor_cpus=0.25, budget=small))
    assert_same(got, lloyd(x16, LCFG))
    fixed = 20 * 12 * 16 + 128 * (4 * 12 + 14 * 16)  # centroids and sums, one block's scratch
    fits = (small.data_bytes - fixed) // (2 * 16 + 8)
    assert fits == B.kmeans_shard_rows(small, 16, 12, block_rows=128) == 672
    assert [a.rows for a in got.actors] == [640] * 4 + [440]  # 5 actors of whole 128-row blocks, not 1
    for a in got.actors:
        assert a.memory == small.base_bytes + 2 * (a.rows * 40 + fixed) <= small.worker_bytes  # Ray's reservation
    assert math.ceil(3000 / 640) == len(got.actors)


def test_subset_in_given_order_and_random_init(ray_local, folder):
    path, x16 = folder
    rows = np.random.default_rng(1).permutation(len(x16))[:2100]  # a candidate subset, in its own order
    cfg = LloydConfig(k=9, niter=6, seed=5, init="random", block_rows=256)
    want = lloyd(x16[rows], cfg)
    got = dkmeans(path, DKMeansConfig(lloyd=cfg, n_actors=2), store_rows=rows)
    assert_same(got, want)


def test_empty_clusters_are_reseeded_deterministically(ray_local, folder):
    path, x16 = folder
    # 12 centroids, each of 4 values 3 times. Basis vectors: a row's cosine with one is a single
    # coordinate, exact in float32 whatever the BLAS kernel sums, so copies tie bit for bit (with
    # rows as centroids, an AMD OpenBLAS kernel scored one copy a last bit higher than its twin)
    init = np.repeat(np.eye(x16.shape[1])[:4], 3, axis=0)
    first = lloyd(x16, LloydConfig(k=12, niter=0, block_rows=128), init_KD=init)
    empty = np.flatnonzero(first.sizes() == 0)
    assert empty.tolist() == [1, 2, 4, 5, 7, 8, 10, 11]  # ties go to the lower id: the copies start empty
    # one step later each empty cluster, in id order, sits on one of the rows farthest from
    # their centroid, farthest first (ties by row)
    far = np.lexsort((np.arange(len(x16)), first.score_N))[:8]
    for n_actors in (None, 2):
        cfg = LloydConfig(k=12, niter=1, block_rows=128)
        step = (
            lloyd(x16, cfg, init_KD=init)
            if n_actors is None
            else dkmeans(path, DKMeansConfig(lloyd=cfg, n_actors=2), init_KD=init)
        )
        unit_far = x16[far].astype(np.float64) / np.linalg.norm(x16[far].astype(np.float64), axis=1, keepdims=True)
        np.testing.assert_array_equal(step.centroids_KD[empty], unit_far.astype(np.float32))
    cfg = LloydConfig(k=12, niter=6, block_rows=128)
    want = lloyd(x16, cfg, init_KD=init)
    got = dkmeans(path, DKMeansConfig(lloyd=cfg, n_actors=2), init_KD=init)
    assert_same(got, want)
    assert (got.sizes_K > 0).all()


def test_labels_written_by_the_actors(ray_local, folder, tmp_path):
    path, x16 = folder
    got = cluster_vector_folder(path, 12, n_actors=2, niter=8, seed=3, out_dir=tmp_path)
    assert got.assign_N is None
    table = pq.read_table(tmp_path).sort_by("row")
    ref = dkmeans(path, DKMeansConfig(lloyd=LloydConfig(k=12, niter=8, seed=3), n_actors=1))
    np.testing.assert_array_equal(table["cluster"].to_numpy(), ref.assign_N)
    assert table["uid"].to_pylist() == open_vectors(path).uids.tolist()


def test_shards_are_block_aligned_and_cover_the_pool(folder):
    path, _ = folder
    npys, counts = folder_parts(path)
    assert counts.tolist() == list(PART_SIZES)
    specs = plan_shards(npys, counts, 3, 128)
    assert [s.first for s in specs] == [0, 1024, 2048] and [s.n for s in specs] == [1024, 1024, 952]


def test_errors_name_the_fix(ray_local, folder):
    path, _ = folder
    with pytest.raises(ValueError, match="lower k"):
        dkmeans(path, DKMeansConfig(lloyd=LloydConfig(k=4000)))
    with pytest.raises(ValueError, match="n_actors"):
        DKMeansConfig(lloyd=LCFG, n_actors=0)
    with pytest.raises(ValueError, match="init"):
        LloydConfig(k=3, init="bogus")
    with pytest.raises(FileNotFoundError, match="embed stage"):
        dkmeans(path / "missing", DKMeansConfig(lloyd=LCFG))


@pytest.fixture(scope="module")
def run_with_vectors(ray_local, tmp_path_factory):
    """A run folder (ingest + dedup of 40 photos) whose vector folder holds the candidates'
    vectors in two parts, out of uid order, beside 7 vectors of images that are not candidates."""
    root, run = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("run")
    testdata.write_photo_jpegs(root, 40, side=48)
    ingest_dedup.run_ingest(ingest_dedup.plan([str(root)], 20), run, IngestConfig())
    ingest_dedup.run_dedup(run, DedupConfig())
    uids = rundir.candidates(run)[::-1] + [f"not-a-candidate-{i}" for i in range(7)]
    x16 = blobs16(len(uids), 16, 5, seed=2)
    write_vectors(rundir.vectors_dir(run), 0, uids[:20], x16[:20])
    write_vectors(rundir.vectors_dir(run), 1, uids[20:], x16[20:])
    return run


def test_cluster_stage_on_ray_equals_the_stage_in_one_task(run_with_vectors):
    run = run_with_vectors
    got = {}
    for engine, actors, hierarchical in (("lloyd", None, True), ("ray", 2, True), ("auto", 1, False)):
        cfg = stages_select.ClusterConfig(
            k=6,
            hierarchical=hierarchical,
            engine=engine,
            actors=actors,
            block_rows=16,
            distributed_above=30,
            partitioned=False,  # the one task (the partitioned stage: the next test)
        )
        stages_select.run_cluster(run, cfg)
        got[engine] = rundir.clusters(run)
    assert got["lloyd"][0]["uid"].to_pylist() == rundir.candidates(run) and got["lloyd"][0].num_rows >= 30
    assert sorted(set(got["lloyd"][1]["level"].to_pylist())) == [0, 1]  # ks (6, 2)
    assert got["ray"][0].equals(got["lloyd"][0]) and got["ray"][1].equals(got["lloyd"][1])
    # "auto" went to Ray (above distributed_above): a flat tree with the same level 1
    flat, tree = got["auto"]
    assert flat.select(["uid", "leaf", "score"]).equals(got["lloyd"][0].select(["uid", "leaf", "score"]))
    assert tree.equals(
        got["lloyd"][1]
        .filter(pc.equal(got["lloyd"][1]["level"], 0))
        .set_column(2, "parent", pa.array([-1] * 6, pa.int64()))
    )
    # the level-1 labels are the single-process Lloyd's on the candidates' vectors in store-row
    # order (the partitioned stage's order), written in uid order
    store = open_vectors(rundir.vectors_dir(run))
    rows = np.sort(store.rows(rundir.candidates(run)))
    want = lloyd(store.take(rows), stages_select.ClusterConfig(k=6, block_rows=16).lloyd(6))
    by_uid = dict(zip(store.uids[rows].tolist(), want.assign_N.tolist()))
    assert got["lloyd"][0]["leaf"].to_pylist() == [by_uid[u] for u in rundir.candidates(run)]
    assert not np.array_equal(rows, store.rows(rundir.candidates(run)))  # the orders differ here


def test_partitioned_cluster_and_balanced_sampling_equal_their_one_tasks(run_with_vectors, tmp_path, monkeypatch):
    """No task holds the pool (`scale.pcluster`): candidates by uid buckets (here 4 buckets, 3
    uid ranges), level 1 on 2 actors that read their own store rows, labels written by the
    actors. Against the one-task stage: the same table and tree. The run has decontaminated
    candidates, vectors of non-candidates, and a candidate with a second vector in a later part
    (its first store row counts)."""
    run = tmp_path / "run"
    shutil.copytree(run_with_vectors, run)
    cands = rundir.candidates(run)
    (run / "decontam").mkdir()
    pq.write_table(pa.table({"uid": pa.array(cands[3:9], pa.string())}), run / "decontam" / "decontaminated.parquet")
    assert rundir.candidates(run) == cands[:3] + cands[9:]
    write_vectors(rundir.vectors_dir(run), 2, [cands[20]], blobs16(1, 16, 1, seed=9))
    monkeypatch.setattr(pcluster, "RECORDS_PER_TASK", 12)  # 40 records, 31 candidates: 4 buckets, 3 ranges
    common = dict(k=6, hierarchical=True, block_rows=16, niter=6)  # ks (6, 2): the tree's upper level too
    stages_select.run_cluster(run, stages_select.ClusterConfig(engine="lloyd", **common))
    one = rundir.clusters(run)
    cfg = stages_select.ClusterConfig(engine="ray", actors=2, partitioned=True, **common)
    marker = stages_select.run_cluster(run, cfg).markers[0]
    assert marker["partitioned"] is True and marker["rows"]["main"] == len(cands) - 6
    got = rundir.clusters(run)
    assert got[0].equals(one[0]) and got[1].equals(one[1])
    assert len(set(got[0]["leaf"].to_pylist())) == 6 and set(got[1]["level"].to_pylist()) == {0, 1}
    assert not (run / "cluster" / pcluster.WORK).exists()

    # balanced sampling without seeds, partitioned (`scale.pretrieve`: chunks of the clusters table,
    # leaf buckets, uid ranges) against its one task: the same selection, counts and seeds tables.
    # The partitioned cluster stage wrote a row group per uid range: the map wave has several chunks.
    monkeypatch.setattr(pretrieve, "RECORDS_PER_TASK", 12)  # 34 candidates: 2 chunks, 3 leaf buckets
    assert pq.ParquetFile(rundir.stage_dir(run, "cluster") / "clusters.parquet").num_row_groups >= 3
    sel = {}
    for partitioned in (False, True):
        rcfg = stages_retrieve.RetrieveConfig(method="hierarchical", target=13, seed=5, partitioned=partitioned)
        marker = stages_retrieve.run_retrieve(run, {}, rcfg).markers[0]
        assert marker.get("partitioned", False) is partitioned
        sel[partitioned] = [rundir.selection(run, what) for what in ("", "counts", "seeds")]
    for one, part in zip(sel[False], sel[True]):
        assert part.equals(one.cast(part.schema)), (one, part)
    chosen = sel[True][0]
    assert chosen.num_rows == 13 and chosen["uid"].to_pylist() == sorted(chosen["uid"].to_pylist())
    sizes = np.bincount(got[0]["leaf"].to_numpy(), minlength=6)
    taken = np.bincount(chosen["cluster_id"].to_numpy(), minlength=6)
    assert (taken <= sizes).all() and (taken > 0).sum() >= 5  # spread over the tree, not one cluster


def _seed_run(root, run, n: int, seed: int, near: np.ndarray) -> Path:
    """A seed run: `n` photos ingested and deduped, their vectors `near` (stored out of uid order,
    in two parts) rather than embedded."""
    testdata.write_photo_jpegs(root, n, side=40, seed=seed)
    ingest_dedup.run_ingest(ingest_dedup.plan([str(root)], 4), run, IngestConfig())
    ingest_dedup.run_dedup(run, DedupConfig())
    uids = rundir.candidates(run)[::-1]
    rng = np.random.default_rng(seed)
    x = near[: len(uids)].astype(np.float32) + 0.05 * rng.standard_normal((len(uids), near.shape[1]))
    x16 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    write_vectors(rundir.vectors_dir(run), 0, uids[:3], x16[:3])
    write_vectors(rundir.vectors_dir(run), 1, uids[3:], x16[3:])
    return run


def test_partitioned_retrieval_with_seeds_equals_its_one_task(run_with_vectors, tmp_path, monkeypatch):
    """Retrieval with two seed sets (`scale.pseeds`): the pool's candidates on a sharded index that
    reads their store rows, seeds queried 4 at a time, hits deduped by candidate range, each set
    capped at its cut, then unioned. Against the one task: the same selection, counts and seeds
    tables, for sample-based retrieval (with and without a cap) and cluster-based retrieval."""
    run = tmp_path / "run"
    shutil.copytree(run_with_vectors, run)
    store = open_vectors(rundir.vectors_dir(run))
    cands = rundir.candidates(run)
    x = store.get(cands)
    # set "a" near candidates 0..8, set "b" near 5..10: the sets overlap, and within a set
    # several seeds find one candidate (collisions)
    seeds = {"a": _seed_run(tmp_path / "pa", tmp_path / "sa", 9, 3, x[:9]),
             "b": _seed_run(tmp_path / "pb", tmp_path / "sb", 6, 4, x[5:11])}  # fmt: skip
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=5, engine="lloyd", block_rows=16, niter=6))
    for mod in (pcluster, pretrieve, pseeds):
        monkeypatch.setattr(mod, "RECORDS_PER_TASK", 12)  # several buckets, candidate and uid ranges
    monkeypatch.setattr(pseeds, "CHUNK", 4)
    cases = {
        "sample": dict(method="sample", k=4, include_seeds=True),
        "sample capped": dict(method="sample", k=4, target=7),
        "cluster capped": dict(method="cluster", min_seeds=2, per_cluster=4, target=6, seed=3),
    }
    for case, kw in cases.items():
        sel = {}
        for partitioned in (False, True):
            cfg = stages_retrieve.RetrieveConfig(partitioned=partitioned, **kw)
            marker = stages_retrieve.run_retrieve(run, seeds, cfg).markers[0]
            assert marker.get("partitioned", False) is partitioned
            sel[partitioned] = [rundir.selection(run, what) for what in ("", "counts", "seeds")]
        for one, part in zip(sel[False], sel[True]):
            assert part.equals(one.cast(part.schema)), (case, one.to_pydict(), part.to_pydict())
        table, counts = sel[True][0], sel[True][1].to_pylist()
        assert table["uid"].to_pylist() == sorted(table["uid"].to_pylist()) and table.num_rows > 0, case
        assert not (run / "retrieve" / pseeds.WORK).exists()
        if case == "sample":
            assert {r["seed_set"] for r in counts} == {"a", "b"} and counts[0]["overlaps"] > 0
            assert sum(r["n_collisions"] for r in counts) > 0
            assert sel[True][2].num_rows == 15  # every seed shipped (none of them is in the pool)
        if case == "sample capped":
            assert [r["n_selected"] for r in counts] == [7, 7] and all(r["n_capped"] > 0 for r in counts)
        if case == "cluster capped":
            assert sum(r["n_selected"] for r in counts) >= table.num_rows > 0
            assert set(table["method"].to_pylist()) == {"cluster"}


def test_auto_engine_distributes_above_the_threshold():
    cfg = stages_select.ClusterConfig(distributed_above=1000)
    assert cfg.engine_for(999) == "faiss" and cfg.engine_for(1000) == "ray"
    assert stages_select.ClusterConfig(engine="lloyd").engine_for(10**9) == "lloyd"
    with pytest.raises(ValueError, match="engine"):
        stages_select.ClusterConfig(engine="spark")
    with pytest.raises(ValueError, match="rows_per_actor"):
        stages_select.ClusterConfig(rows_per_actor=0)


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from lvd.curation.lloyd import LloydConfig, lloyd
    from lvd.curation.scale.dkmeans import DKMeansConfig, dkmeans
    from lvd.curation.vectors import open_vectors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        cfg = LloydConfig(k=12, niter=8, seed=3, block_rows=128)
        got = dkmeans(sys.argv[1], DKMeansConfig(lloyd=cfg, n_actors=3))
        want = lloyd(open_vectors(sys.argv[1]).load().vecs_ND, cfg)
        print("RESULT " + json.dumps({
            "centroids_equal": bool(np.array_equal(got.centroids_KD, want.centroids_KD)),
            "labels_equal": bool(np.array_equal(got.assign_N, want.assign_N)),
            "nodes": len({a.node for a in got.actors}),
            "rows": [a.rows for a in got.actors],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_three_node_cluster_equals_single_process(folder):
    path, _ = folder
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    got = json.loads(lines[0][len("RESULT ") :])
    assert got == {"centroids_equal": True, "labels_equal": True, "nodes": 3, "rows": [1024, 1024, 952]}


def test_cluster_stage_refuses_a_pool_its_task_cannot_hold(run_with_vectors, monkeypatch):
    """Under --worker-memory the cluster stage's one task (forced: engine "lloyd") refuses a pool
    over ~460 B a candidate before any work, naming a budget that would hold it."""
    import re

    from lvd.curation import runner

    run = run_with_vectors
    n = len(rundir.candidates(run))
    budget = B.WorkerBudget(B.parse_bytes("512MiB"))
    assert B.cluster_task_images(budget) == (256 * B.MiB) // 460 > n  # the real constant: fits
    unit = runner.WholeStage(fingerprint="x", stem="clusters")
    fn = stages_select.ClusterFn(str(run), stages_select.ClusterConfig(k=3, engine="lloyd"))
    monkeypatch.setattr(B, "CLUSTER_TASK_IMAGE_BYTES", 256 * B.MiB // (n - 1))  # one candidate too many
    with B.job_budget(budget), pytest.raises(B.OverBudgetError, match=f"holds its {n:,} candidates") as err:
        fn(unit)
    suggested = re.search(r"--worker-memory (\S+) or more", str(err.value)).group(1)
    assert B.cluster_task_images(B.WorkerBudget(B.parse_bytes(suggested))) >= n
    monkeypatch.setattr(B, "CLUSTER_TASK_IMAGE_BYTES", 256 * B.MiB // n)  # exactly fits
    with B.job_budget(budget):
        assert fn(unit)[""].num_rows == n


def test_retrieve_stage_refuses_a_pool_its_task_cannot_hold(run_with_vectors, monkeypatch):
    """The same for the retrieve stage's one task (~370 B a candidate, measured): refused before
    any work past the budget, with a budget that would hold it; run to the end when it fits."""
    import re

    from lvd.curation import runner
    from lvd.curation.stages import retrieve

    run = run_with_vectors
    n = len(rundir.candidates(run))
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=4, engine="lloyd", hierarchical=True))
    budget = B.WorkerBudget(B.parse_bytes("512MiB"))
    assert B.retrieve_task_images(budget) == (256 * B.MiB) // 370 > n  # the real constant: fits
    unit = runner.WholeStage(fingerprint="x", stem="selection")
    fn = retrieve.RetrieveFn(str(run), {}, retrieve.RetrieveConfig(method="hierarchical", target=n // 2))
    monkeypatch.setattr(B, "RETRIEVE_TASK_IMAGE_BYTES", 256 * B.MiB // (n - 1))  # one candidate too many
    with (
        B.job_budget(budget),
        pytest.raises(B.OverBudgetError, match=f"retrieve stage holds its {n:,} candidates") as err,
    ):
        fn(unit)
    suggested = re.search(r"--worker-memory (\S+) or more", str(err.value)).group(1)
    assert B.retrieve_task_images(B.WorkerBudget(B.parse_bytes(suggested))) >= n
    monkeypatch.setattr(B, "RETRIEVE_TASK_IMAGE_BYTES", 256 * B.MiB // n)  # exactly fits
    with B.job_budget(budget):
        assert fn(unit)[""].num_rows == n // 2
