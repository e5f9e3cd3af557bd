"""Sharded k-NN (lvd.curation.scale.shardindex) against one in-process Faiss index.

Exact mode must give `knn_index.search`'s answer bit for bit (ids and similarities, ties
included); IVF mode must reach recall@k >= 0.95 against exact search, and with one shared
quantiser it gives what one IVF index gives. Shards run as actors on the session's Ray, and
once on a 3-node `ray.cluster_utils.Cluster` (in a subprocess: the session's Ray is this
process's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lvd.curation import copydetect, knn_index, rundir, vectors
from lvd.curation.knn_index import IndexConfig
from lvd.curation.retrieve import SampleRetrievalConfig, sample_based
from lvd.curation.scale import budget as B
from lvd.curation.scale import shardindex as si
from lvd.curation.stages.retrieve import RetrieveConfig, RetrieveFn

PART_ROWS = (500, 700, 0, 300, 900, 600, 400)  # uneven, one empty part
D = 32


def mixture(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres (clustered like embeddings), float16 as the embed stage stores them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A vector folder of 3,400 rows in 7 parts; rows 50, 2000 and 3000 are one vector (one per shard) (exact ties)."""
    x = mixture(sum(PART_ROWS), 0)
    x[2000] = x[3000] = x[50]
    folder = tmp_path_factory.mktemp("vectors")
    start = 0
    for j, n in enumerate(PART_ROWS):
        vectors.write_vectors(folder, j, [f"u{start + i:05d}" for i in range(n)], x[start : start + n])
        start += n
    return folder, x


def exact(x: np.ndarray, q: np.ndarray, k: int) -> knn_index.Neighbours:
    return knn_index.search(knn_index.build_index(x), q, k)


def recall(approx: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a >= 0], r)) / len(r) for a, r in zip(approx, ref)]))


EXACT3 = si.ShardConfig(mode="exact", n_shards=3, query_block=97, num_cpus=0.5)
IVF3 = si.ShardConfig(index=IndexConfig(nlist=48, nprobe=12), mode="ivf", n_shards=3, num_cpus=0.5)


def test_exact_sharded_equals_one_index(pool, ray_local):
    folder, x = pool
    q = np.concatenate([x[::9], mixture(100, 1)])
    with si.build(folder, cfg=EXACT3) as index:
        assert index.n_shards == 3 and index.shard_rows == [1200, 1200, 1000]
        assert index.exact and len(index) == len(x)
        got, ref = index.neighbours(q, 16), exact(x, q, 16)
        np.testing.assert_array_equal(got.ids_QK, ref.ids_QK)
        np.testing.assert_array_equal(got.sims_QK, ref.sims_QK)
        # the pool against itself: copy candidates as copydetect.knn_lists, and the pair graph
        np.testing.assert_array_equal(index.knn_lists(8), copydetect.knn_lists(x, 8))
        pairs = index.similar_pairs(k=8, threshold=0.5)
        want = knn_index.similar_pairs(x, knn_index.build_index(x), k=8, threshold=0.5)
        for a, b in zip(pairs, want):
            np.testing.assert_array_equal(a, b)


def test_ties_go_to_the_lower_id_across_shards(pool, ray_local):
    """Rows 50, 2000, 3000 are one vector in three shards: k=2 must keep 50 and 2000."""
    folder, x = pool
    with si.build(folder, cfg=EXACT3) as index:
        nb = index.neighbours(x[[3000]], 2)
    assert nb.ids_QK.tolist() == [[50, 2000]] and nb.sims_QK[0, 0] == nb.sims_QK[0, 1]
    assert exact(x, x[[3000]], 2).ids_QK.tolist() == [[50, 2000]]


def test_a_subset_by_uid_is_numbered_by_position(pool, ray_local):
    """Built for some uids (shuffled), ids are positions in that list, as `store.get(uids)` + one index."""
    folder, x = pool
    rng = np.random.default_rng(2)
    rows = rng.permutation(len(x))[:2000]
    uids = [f"u{r:05d}" for r in rows]
    q = mixture(150, 3)
    with si.build(folder, uids, EXACT3) as index:
        got = index.neighbours(q, 10)
        blocks = list(index.query_blocks())
    ref = exact(x[rows], q, 10)
    np.testing.assert_array_equal(got.ids_QK, ref.ids_QK)
    np.testing.assert_array_equal(got.sims_QK, ref.sims_QK)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), np.arange(2000))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), x[rows].astype(np.float32))


def test_a_small_budget_gives_more_shards_each_within_it_and_the_same_answer(pool, ray_local):
    """Under a worker budget the shard count follows from it: shards of at most
    `budget.knn_shard_rows` rows, each actor holding the Ray memory its rows and fixed bytes need."""
    folder, x = pool
    small = B.WorkerBudget(768 * B.KiB, base_bytes=256 * B.KiB)  # a 256 KiB data share
    cfg = si.ShardConfig(mode="exact", query_block=64, num_cpus=0.25, budget=small)
    sized = si.sized(cfg, len(x), D, 8)
    fixed = 64 * (4 * D + 24 * (8 + 16))  # one query block's queries and answers
    assert sized.rows_per_shard == (small.data_bytes - fixed) // (6 * D + 8) == 1085
    with si.build(folder, cfg=cfg, k=8) as index:
        assert index.shard_rows == [500, 1000, 900, 1000]  # parts 500 | 700 + 300 | 900 | 600 + 400
        memory = [small.base_bytes + 2 * (rows * (6 * D + 8) + fixed) for rows in index.shard_rows]
        assert index.memory == memory == index._call("assigned_memory")  # what Ray reserved for each
        assert max(memory) <= small.worker_bytes
        np.testing.assert_array_equal(index.knn_lists(8), copydetect.knn_lists(x, 8))
    roomy = dataclasses.replace(cfg, budget=B.WorkerBudget(8 * B.MiB, base_bytes=B.MiB))
    with si.build(folder, cfg=roomy, k=8) as index:
        assert index.n_shards == 1 and index.memory[0] < roomy.budget.worker_bytes


def test_the_ivf_training_sample_fits_the_budget():
    """The driver reads the IVF's training sample (nlist * points per list rows, three float32
    copies): under a budget it is cut to `budget.ivf_train_rows`, points per list first (not under
    Faiss's 39), then lists. Measured: at 10^6 x 128 under 512 MiB the driver peaked at 585 MiB
    with the default 4,000 lists x 64 points (`benchmarks/curate_scale.py`, "retrieve seeds")."""
    budget = B.WorkerBudget(B.parse_bytes("512MiB"))
    n, d = 1_000_000, 128
    cfg = si.ShardConfig(budget=budget)
    assert cfg.index.lists_for(n) * cfg.index.train_points_per_list * 3 * 4 * d > budget.data_bytes
    got = si.sized(cfg, n, d, 4).index
    rows = got.lists_for(n) * got.train_points_per_list
    assert rows <= B.ivf_train_rows(budget, d) and rows * 3 * 4 * d <= budget.data_bytes
    assert got.train_points_per_list == B.IVF_MIN_POINTS_PER_LIST and got.lists_for(n) == 87_381 // 39
    assert si.sized(cfg, n, d, 4) == si.sized(si.sized(cfg, n, d, 4), n, d, 4)  # sizing twice changes nothing
    # a sample that fits, an exact index, or no budget: the index as configured
    roomy = si.ShardConfig(budget=B.WorkerBudget(B.parse_bytes("16GiB")))
    assert si.sized(roomy, n, d, 4).index == roomy.index
    assert si.sized(dataclasses.replace(cfg, mode="exact"), n, d, 4).index == cfg.index
    assert si.sized(si.ShardConfig(), n, d, 4).index == si.ShardConfig().index
    # fewer points per list suffice: the lists stay
    fewer = si.sized(si.ShardConfig(budget=budget, index=IndexConfig(train_points_per_list=200)), 250_000, d, 4)
    assert fewer.index.lists_for(250_000) == 2_000 and fewer.index.train_points_per_list == 87_381 // 2_000


def test_knn_lists_in_a_stage_task_is_sharded_by_the_job_budget(pool, ray_local):
    """Copy detection calls knn_lists in its stage's Ray task with no budget of its own: the job's
    (`budget.job_budget`, set by the flow) shards a pool that one worker cannot hold."""
    folder, x = pool
    rows = np.random.default_rng(5).permutation(len(x))[:1700]
    uids = [f"u{r:05d}" for r in rows]
    small = B.WorkerBudget(4 * B.MiB, base_bytes=B.MiB)

    @ray_local.remote
    def stage_task(folder, uids):
        cfg = si.ShardConfig(num_cpus=0.25)
        return si.sized(cfg, len(uids), D, 12, subset=True), si.knn_lists(folder, uids, 12, cfg=cfg)

    with B.job_budget(small):
        sized, lists = ray_local.get(stage_task.remote(str(folder), uids))
    assert sized.budget == small and sized.sharded_above <= len(uids) < si.ShardConfig().sharded_above
    np.testing.assert_array_equal(lists, copydetect.knn_lists(x[rows], 12))


def test_a_subset_goes_to_the_shards_in_uid_chunks(pool, ray_local, monkeypatch):
    """The caller's uids reach the shards in chunks (no shard holds the whole list): positions
    across chunk borders, and a uid asked for twice, come out as one index over `store.get(uids)`."""
    folder, x = pool
    monkeypatch.setattr(si, "UID_CHUNK", 300)  # 2,001 uids: 7 chunks
    rows = np.r_[np.random.default_rng(4).permutation(len(x))[:2000], 7]
    rows[1500] = 7  # store row 7 wanted twice, in different chunks
    uids = [f"u{r:05d}" for r in rows]
    with si.build(folder, uids, EXACT3) as index:
        assert len(index._uid_chunks) == 7 and len(index) == len(uids)
        got = index.knn_lists(6)
    np.testing.assert_array_equal(got, copydetect.knn_lists(x[rows], 6))


def test_ivf_recall_against_exact_and_equal_to_one_ivf(pool, ray_local):
    folder, x = pool
    q = mixture(300, 4)
    with si.build(folder, cfg=IVF3) as index:
        assert not index.exact and index.n_shards == 3
        got = index.neighbours(q, 10)
    ref = exact(x, q, 10)
    r = recall(got.ids_QK, ref.ids_QK)
    assert r >= 0.95, r
    # one quantiser trained on the same sample: the shards together are one IVF index
    one = knn_index.search(knn_index.build_index(x, IndexConfig(exact_below=0, nlist=48, nprobe=12)), q, 10)
    np.testing.assert_array_equal(got.ids_QK, one.ids_QK)


def test_ivf_pq_option(pool, ray_local):
    folder, x = pool
    cfg = si.ShardConfig(index=IndexConfig(nlist=16, nprobe=16), mode="ivf", n_shards=2, pq_m=16, num_cpus=0.5)
    q = mixture(200, 5)
    with si.build(folder, cfg=cfg) as index:
        got = index.neighbours(q, 10)
    assert recall(got.ids_QK, exact(x, q, 10).ids_QK) > 0.5  # 16-byte codes of 32 floats: coarse by design
    with pytest.raises(ValueError, match="must divide the dimension"):
        si.build(folder, cfg=si.ShardConfig(mode="ivf", pq_m=5))


def test_folder_knn_lists_match_copydetect_both_ways(pool, ray_local):
    """The call sites' function: in-process below `sharded_above`, sharded above; same answer."""
    folder, x = pool
    uids = [f"u{r:05d}" for r in range(0, len(x), 2)]
    sub, evals = x[::2], mixture(40, 6)
    for cfg in (si.ShardConfig(), si.ShardConfig(sharded_above=0, n_shards=3, query_block=256, num_cpus=0.5)):
        np.testing.assert_array_equal(si.knn_lists(folder, uids, 12, cfg=cfg), copydetect.knn_lists(sub, 12))
        np.testing.assert_array_equal(
            si.knn_lists(folder, uids, 12, evals, exclude_self=False, cfg=cfg),
            copydetect.knn_lists(sub, 12, evals, exclude_self=False),
        )


def test_retrieval_stage_sharded_above_the_threshold_gives_the_same_selection(pool, ray_local, tmp_path):
    """The retrieve stage's pool index: in-process by default, sharded with knn.sharded_above=0;
    sample-based retrieval (k=4 per seed, collisions merged) picks the same rows either way."""
    folder, x = pool
    run = tmp_path / "run"
    shutil.copytree(folder, rundir.vectors_dir(run))
    uids = np.array([f"u{r:05d}" for r in range(1, len(x), 3)], dtype=object)
    seeds = mixture(30, 8)
    picked = []
    for knn in (si.ShardConfig(), si.ShardConfig(sharded_above=0, n_shards=3, num_cpus=0.5)):
        fn = RetrieveFn(str(run), {}, RetrieveConfig(knn=knn))
        index = fn._pool_index(run, uids)
        assert isinstance(index, si.ShardedIndex) == (knn.sharded_above == 0)
        picked.append(sample_based(index, seeds, SampleRetrievalConfig(k=4)))
        if isinstance(index, si.ShardedIndex):
            index.close()
    one, sharded = picked
    assert one.counts == sharded.counts and one.counts.n_collisions > 0
    for name in ("pool_idx", "seed_idx", "similarity"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(one, name))


def test_merge_is_a_global_top_k():
    """Per-shard answers merged: best similarity first, ties by the lower id, padding last."""
    inf = np.inf
    a = (np.array([[0.9, 0.5, -inf]], np.float32), np.array([[7, 3, -1]]))
    b = (np.array([[0.95, 0.5, 0.1]], np.float32), np.array([[12, 1, 40]]))
    c = (np.array([[-inf, -inf, -inf]], np.float32), np.array([[-1, -1, -1]]))
    nb = si.merge([a, b, c], 4)
    assert nb.ids_QK.tolist() == [[12, 7, 1, 3]]
    assert nb.sims_QK[0].tolist() == pytest.approx([0.95, 0.9, 0.5, 0.5])
    nb = si.merge([a, c], 4)
    assert nb.ids_QK.tolist() == [[7, 3, -1, -1]] and np.isneginf(nb.sims_QK[0, 2:]).all()


def test_bad_configs_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="mode="):
        si.ShardConfig(mode="fast")
    with pytest.raises(ValueError, match="n_shards="):
        si.ShardConfig(n_shards=0)
    with pytest.raises(FileNotFoundError, match="embed stage"):
        si.build(tmp_path / "missing")


def test_cpu_here_and_gpu_asked_for_raises(ray_local):
    """This machine has no GPU: shards are CPU actors, and use_gpu=True says how to get one."""
    assert si._gpu_wanted(None) is False
    with pytest.raises(RuntimeError, match=r"lvd\[gpu\]"):
        si._gpu_wanted(True)


CLUSTER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from lvd.curation.knn_index import IndexConfig
    from lvd.curation.scale import shardindex as si

    folder, queries = sys.argv[1], np.load(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        out = {}
        for name, cfg in [
            ("exact", si.ShardConfig(mode="exact", n_shards=3, query_block=128)),
            ("ivf", si.ShardConfig(index=IndexConfig(nlist=48, nprobe=12), mode="ivf", n_shards=3)),
        ]:
            with si.build(folder, cfg=cfg) as index:
                nb = index.neighbours(queries, 10)
                out[name] = {"ids": nb.ids_QK.tolist(), "sims": nb.sims_QK.tolist(), "nodes": index.node_ids()}
        print("RESULT " + json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_three_node_cluster_gives_the_single_process_result(pool, tmp_path):
    """One shard per node (3 nodes of 1 CPU, the head has none): exact identical, IVF recall >= 0.95."""
    folder, x = pool
    q = np.concatenate([x[::17], mixture(100, 7)]).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", CLUSTER, str(folder), str(tmp_path / "q.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    out = json.loads(lines[0][len("RESULT ") :])
    ref = exact(x, q, 10)
    assert len(set(out["exact"]["nodes"])) == 3
    np.testing.assert_array_equal(np.array(out["exact"]["ids"]), ref.ids_QK)
    np.testing.assert_array_equal(np.array(out["exact"]["sims"], np.float32), ref.sims_QK)
    assert recall(np.array(out["ivf"]["ids"]), ref.ids_QK) >= 0.95


def _pool_sized(folder: Path, parts: int, rows: int = 2_000) -> Path:
    """`parts` parts of `rows` vectors (d=8); part j's uids are p{j}-{i}, so a small pool's
    uids are all in a larger one."""
    for j in range(parts):
        x = np.random.default_rng(j).standard_normal((rows, 8))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        vectors.write_vectors(folder, j, [f"p{j}-{i}" for i in range(rows)], x)
    return folder


def _pool_sized_items(obj, n: int, path: str = "index") -> list[str]:
    """Where the driver-side object graph (this module's objects, arrays, containers; not the
    shards) holds an array or list of n items or more."""
    if isinstance(obj, np.ndarray):
        return [path] if obj.size >= n else []
    if isinstance(obj, (list, tuple)):
        found = [path] if len(obj) >= n else []
        return found + [p for i, v in enumerate(obj) for p in _pool_sized_items(v, n, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [p for key, v in obj.items() for p in _pool_sized_items(v, n, f"{path}.{key}")]
    if type(obj).__module__ == si.__name__ and not isinstance(obj, si.Shard) and hasattr(obj, "__dict__"):
        return _pool_sized_items(vars(obj), n, path)
    return []


def test_the_driver_holds_nothing_pool_sized(tmp_path, ray_local):
    """The driver keeps O(parts) and one query block, whatever N: no pool-sized array in the
    index it returns, and its Python-allocation peak (tracemalloc: numpy reports to it) while
    building for a uid subset and walking it does not grow from a 10,000- to a 120,000-row pool."""
    import tracemalloc

    small, big = _pool_sized(tmp_path / "small", 5), _pool_sized(tmp_path / "big", 60)
    uids = [f"p{j}-{i}" for j in range(5) for i in range(0, 2_000, 40)]  # 250 uids in both pools
    cfg = si.ShardConfig(mode="exact", n_shards=2, query_block=64, num_cpus=0.5)
    with si.build(big, cfg=cfg) as index:
        assert len(index) == 120_000 and _pool_sized_items(index, 2_001) == []
    peaks, answers = [], []
    for folder in (small, big):
        tracemalloc.start()
        with si.build(folder, uids, cfg) as index:
            assert len(index) == len(uids) and _pool_sized_items(index, len(uids)) == []
            answers.append([nb for _, nb in index.self_neighbours(5)])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    np.testing.assert_array_equal(np.concatenate(answers[0]), np.concatenate(answers[1]))
    # mapping the big pool's 120,000 uids in the driver costs several MB (bytes + sort + rows)
    assert peaks[1] - peaks[0] < 1_000_000, peaks
