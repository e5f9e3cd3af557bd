"""`lvd curate --worker-memory`: the budget reaches the partitioned stages, changes no output, and a
too-small one is refused before any work (exit 2). The sizing formulas of lvd.curation.scale.budget
that the stages use (actor memory, k-NN shard rows, k-means actor rows, component partitions) are
checked by value, so dropping a term fails here; the job budget reaches stages run in Ray tasks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvd.cli import main as cli
from lvd.curation import ledger as lg
from lvd.curation import testdata
from lvd.curation.scale import budget as B
from lvd.curation.scale import components as comp
from lvd.curation.scale import shardindex as si
from lvd.curation.stages.retrieve import RetrieveConfig
from lvd.curation.stages.select import ClusterConfig
from lvd.flows import curate as flow
from lvd.flows import curate_tasks as tasks

BUDGET = B.WorkerBudget.parse("600MiB")


def test_budget_sizes_follow_it_and_no_budget_keeps_todays():
    assert tasks.dedup_sizes(7, None) == (None, None)
    partitioned, shuffle = tasks.dedup_sizes(7, BUDGET)  # a small run: the one task still fits
    assert partitioned is None and shuffle.task_options == {"memory": BUDGET.worker_bytes}
    assert (shuffle.buckets, shuffle.exact_buckets) == (1, 8)  # blocks: the fewest that fit (each costs work)
    partitioned, shuffle = tasks.dedup_sizes(200_000, BUDGET)  # 200k records x 1.9 KB > 172 MiB
    assert partitioned is True
    assert shuffle.buckets == B.hash_block_count(200_000, BUDGET) == -(-200_000 * 8200 // BUDGET.data_bytes)
    assert shuffle.buckets == 10 and shuffle.exact_buckets == 8
    big = tasks.dedup_sizes(10**6, BUDGET)[1]
    assert big.exact_buckets == B.hash_bucket_count(10**6, BUDGET) > 8
    assert big.buckets == B.hash_block_count(10**6, BUDGET)

    cfg = ClusterConfig()
    assert tasks.cluster_sizes(cfg, 10_000, 128, BUDGET) is cfg  # one-task k-means: fingerprint kept
    big = tasks.cluster_sizes(cfg, 4_000_000, 128, BUDGET)
    assert big.rows_per_actor == B.kmeans_shard_rows(BUDGET, 128, 2000, block_rows=2048)  # lloyd's block at 4M
    assert big.partitioned is True  # 4M candidates: more than the one task holds at this budget
    fits = B.cluster_task_images(BUDGET)
    assert tasks.cluster_sizes(cfg, fits, 128, BUDGET) is cfg
    assert tasks.cluster_sizes(cfg, fits + 1, 128, BUDGET).partitioned is True  # partitioned, not refused
    assert tasks.cluster_sizes(ClusterConfig(engine="lloyd"), 4_000_000, 128, BUDGET).partitioned is None
    rcfg = RetrieveConfig()
    assert tasks.retrieve_sizes(rcfg, 10_000, 128, BUDGET) is rcfg
    knn = tasks.retrieve_sizes(rcfg, 4_000_000, 128, BUDGET).knn
    assert knn.budget == BUDGET and knn.query_block == min(16_384, B.query_block_rows(BUDGET, 128, rcfg.k))
    nlist = knn.index.lists_for(4_000_000)  # the training sample cut to the budget: fewer lists
    assert nlist * knn.index.train_points_per_list <= B.ivf_train_rows(BUDGET, 128)
    assert nlist < rcfg.knn.index.lists_for(4_000_000)
    fixed = B.knn_shard_fixed_bytes(128, rcfg.k, query_rows=knn.query_block, nlist=nlist, n_uids=si.UID_CHUNK)
    assert knn.rows_per_shard == (BUDGET.data_bytes - fixed) // B.vector_row_bytes(128, "ivf")
    # a pool that one worker cannot hold is sharded whatever the default threshold says
    tight = tasks.retrieve_sizes(RetrieveConfig(), 150_000, 1024, BUDGET).knn
    assert tight.sharded_above == tight.rows_per_shard + 1 <= 150_000 < RetrieveConfig().knn.sharded_above


MiB = B.MiB


def test_actor_memory_is_the_base_plus_what_it_holds_over_fill_at_most_the_budget():
    b = B.WorkerBudget(1 << 30)  # base 256 MiB, fill 0.5: data share 384 MiB
    assert B.actor_memory(b, 0) == 256 * MiB
    assert B.actor_memory(b, 100 * MiB) == (256 + 200) * MiB
    assert B.actor_memory(b, b.data_bytes) == b.worker_bytes  # a full partition asks for the budget
    assert B.actor_memory(b, 10 * b.data_bytes) == b.worker_bytes  # never more
    small = B.WorkerBudget(4 * MiB, base_bytes=MiB, fill=0.25)
    assert B.actor_memory(small, 100_000) == MiB + 400_000


def test_knn_shard_rows_leave_room_for_the_query_block_quantiser_and_uids():
    b = B.WorkerBudget(1 << 30)
    q, k, d = 1_000, 10, 128
    search = q * (4 * d + 24 * (k + B.KNN_EXTRA))
    assert B.knn_shard_fixed_bytes(d, k, query_rows=q) == search
    assert B.knn_shard_fixed_bytes(d, k, query_rows=q, nlist=512) == search + 512 * d * 4
    assert B.knn_shard_fixed_bytes(d, k, query_rows=q, nlist=512, pq_bytes=16) == search + 512 * d * 4 + 256 * d * 4
    assert B.knn_shard_fixed_bytes(d, k, query_rows=q, n_uids=1000) == search + 1000 * B.KNN_UID_BYTES
    fixed = search + 512 * d * 4
    rows = B.knn_shard_rows(b, d, k, query_rows=q, index="ivf", nlist=512)
    assert rows == (384 * MiB - fixed) // (6 * d + 16)
    assert B.knn_shard_rows(b, d, k, query_rows=q, index="ivfpq", nlist=512, pq_bytes=16) == (
        384 * MiB - fixed - 256 * d * 4
    ) // (16 + 16)
    # the memory a shard asks for: its rows and fixed bytes over fill, plus the base; a full shard asks for B
    assert B.knn_shard_memory(b, 1_000, d, k, query_rows=q, index="ivf", nlist=512) == 256 * MiB + 2 * (
        1_000 * 784 + fixed
    )
    assert B.knn_shard_memory(b, rows, d, k, query_rows=q, index="ivf", nlist=512) <= b.worker_bytes
    assert B.knn_shard_memory(b, rows + 200, d, k, query_rows=q, index="ivf", nlist=512) == b.worker_bytes
    with pytest.raises(ValueError, match="raise --worker-memory"):
        B.knn_shard_rows(b, d, k, query_rows=q, n_uids=2_000_000)  # 720 MB of uids per shard


def test_kmeans_actor_rows_leave_room_for_centroids_and_a_block():
    b = B.WorkerBudget(1 << 30)
    d, k, blk = 128, 1000, 4096
    fixed = 20 * k * d + blk * (4 * k + 14 * d)
    assert B.kmeans_fixed_bytes(d, k, block_rows=blk) == fixed
    assert B.kmeans_shard_rows(b, d, k, block_rows=blk) == (384 * MiB - fixed) // (2 * d + 8)
    assert B.kmeans_actor_memory(b, 10_000, d, k, block_rows=blk) == 256 * MiB + 2 * (10_000 * 264 + fixed)
    with pytest.raises(ValueError, match="raise --worker-memory"):
        B.kmeans_shard_rows(b, 1024, 100_000)


def test_component_partitions_follow_the_edges_and_the_budget():
    b = B.WorkerBudget(1 << 30)
    # a star step holds its partition's edges both ways and as many new ones, SKEW times its share
    for e in (0, 1, 10**6, 10**7, 10**9):
        assert B.component_partitions(e, b) == max(1, math.ceil(4 * e * B.EDGE_ROW_BYTES * B.SKEW / (384 * MiB)))
    assert B.component_partitions(10**7, b) == 30
    assert B.component_partitions(10**7, B.WorkerBudget(4 << 30)) == 6  # a bigger budget: fewer partitions
    # the components take at least the budget's count, the budget from the tasks' Ray memory too
    assert comp.partitions_for(comp.ComponentsConfig(), 10**7) == 8  # no budget: as configured
    assert comp.partitions_for(comp.ComponentsConfig(budget=b), 10**7) == 30
    assert comp.partitions_for(comp.ComponentsConfig(task_options=B.ray_options(b)), 10**7) == 30
    assert comp.partitions_for(comp.ComponentsConfig(budget=b), 10**5) == 8


def _edges(folder, n_nodes: int, n_edges: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    uids = [f"{x:064x}" for x in rng.integers(0, 2**62, n_nodes)]
    pixels = rng.choice([100, 200, 300], n_nodes)
    a, b = rng.integers(0, n_nodes, n_edges), rng.integers(0, n_nodes, n_edges)
    keep = a != b
    a, b = a[keep], b[keep]
    folder.mkdir(parents=True)
    files = []
    for i, s in enumerate(np.array_split(np.arange(len(a)), 3)):
        t = pa.table({
            "uid_a": [uids[a[j]] for j in s], "uid_b": [uids[b[j]] for j in s],
            "pixels_a": pixels[a[s]], "pixels_b": pixels[b[s]],
            "channel": ["x"] * len(s), "distance": rng.integers(0, 9, len(s)).astype(float),
        })  # fmt: skip
        files.append(folder / f"e{i}.parquet")
        pq.write_table(t, files[-1])
    return files


def _components(report) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in report.outputs]).sort_by("uid")


def test_components_under_a_small_budget_use_more_partitions_and_give_the_same_groups(ray_local, tmp_path):
    files = _edges(tmp_path / "edges", 400, 700, seed=0)
    e = comp.edge_count(files)
    assert e == sum(pq.read_metadata(f).num_rows for f in files) > 600
    one = comp.components(files, tmp_path / "one", comp.ComponentsConfig(partitions=1))
    tiny = B.WorkerBudget(2 * MiB, base_bytes=MiB)  # 512 KiB of edges per task
    cfg = comp.ComponentsConfig(partitions=1, budget=tiny, task_options={"num_cpus": 0.5})
    report = comp.components(files, tmp_path / "budget", cfg)
    assert len(report.outputs) == B.component_partitions(e, tiny) == math.ceil(4 * e * 150 * 2 / (512 * 1024)) > 1
    assert _components(report).equals(_components(one))


def test_the_job_budget_reaches_ray_tasks_and_their_actors_and_is_cleared_after(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Probe:
        def seen(self):
            b = B.current()
            return None if b is None else dataclasses.astuple(b)

    @ray.remote(num_cpus=0)
    def in_a_task():  # as copy detection's k-NN runs: in a stage's task, an actor started from it
        mine = B.current()
        probe = Probe.remote()
        return None if mine is None else dataclasses.astuple(mine), ray.get(probe.seen.remote())

    small = B.WorkerBudget(4 * MiB, base_bytes=MiB)
    assert ray.get(in_a_task.remote()) == (None, None)
    with B.job_budget(small):
        assert B.current() == small
        assert ray.get(in_a_task.remote()) == (dataclasses.astuple(small),) * 2
        with B.job_budget(BUDGET):
            assert ray.get(in_a_task.remote())[0] == dataclasses.astuple(BUDGET)
        assert ray.get(in_a_task.remote())[0] == dataclasses.astuple(small)  # the outer one back
    assert B.current() is None and ray.get(in_a_task.remote()) == (None, None)


def _curate(folder, tar, run, *extra) -> int:
    argv = ["curate", "--input", str(folder), "--input", str(tar), "--out", str(run), "--partition-size", "4"]
    return cli.main([*argv, "--no-copy-detection", *extra])


def _rows(run) -> list[dict]:
    return sorted(lg.read_ledger(run).to_pylist(), key=lambda r: r["source"])


def test_worker_memory_reaches_the_stages_and_changes_no_ledger(ray_local, prefect_harness, tmp_path, monkeypatch):
    folder = tmp_path / "dump"
    testdata.write_photo_jpegs(folder / "big", 5, side=160)
    testdata.write_photo_jpegs(folder / "again", 3, side=160)  # the first three again: duplicates
    tar = tmp_path / "hostile.tar"
    testdata.write_hostile_tar(tar)
    assert _curate(folder, tar, tmp_path / "plain") == 0

    seen: dict[str, dict] = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen[name] = kw
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(flow.stages, "run_dedup", spy("dedup", flow.stages.run_dedup))
    monkeypatch.setattr(flow.ledger, "write_parts", spy("ledger", flow.ledger.write_parts))
    monkeypatch.setattr(tasks.stages_select, "run_shards", spy("shard", tasks.stages_select.run_shards))
    # a record costs a worker 30 MB here: the budget's data share holds ~6 of them, so this run
    # (16 records) takes the partitioned shuffle, as a pool of 10^5 records would under 600MiB
    monkeypatch.setattr(B, "HASH_WORK", 30e6 / B.HASH_RECORD_BYTES)
    assert _curate(folder, tar, tmp_path / "budget", "--worker-memory", "600MiB") == 0

    assert seen["dedup"]["partitioned"] is True
    assert seen["dedup"]["shuffle"].task_options == {"memory": 600 * B.MiB}
    assert seen["ledger"] == {"range_rows": B.ledger_range_rows(BUDGET)}
    assert seen["shard"] == {"range_rows": B.shard_plan_range_rows(BUDGET)}
    plain, budget = _rows(tmp_path / "plain"), _rows(tmp_path / "budget")
    assert any(r["status"] == "duplicate" for r in plain)
    assert budget == plain


@pytest.mark.parametrize("size", ["1KiB", "500MiB", "lots"])
def test_too_small_or_bad_worker_memory_exits_2_before_any_work(tmp_path, capsys, size):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["curate", "--input", str(tmp_path), "--out", str(run), "--worker-memory", size])
    assert e.value.code == 2 and not run.exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--worker-memory" in err


def test_the_flow_refuses_a_too_small_budget_before_claiming_the_folder(tmp_path):
    with pytest.raises(ValueError, match="use at least 512 MiB"):
        flow.curate.fn([str(tmp_path)], str(tmp_path / "run"), worker_memory="1KiB")
    assert not (tmp_path / "run").exists()


def test_the_copy_decontam_cluster_and_retrieve_tasks_run_their_stage_under_the_job_budget(
    prefect_harness, monkeypatch, tmp_path
):
    """Those stages run in a Ray task that takes no budget parameter: the flow's task sets the
    job budget around them (and clears it after). Each stage is stopped as it starts."""
    from prefect import flow

    from lvd.curation.copydetect import CopyDetectConfig
    from lvd.curation.runner import RunnerConfig

    class Started(Exception):
        pass

    seen = {}

    def stage(name):
        def run(*a, **kw):
            seen[name] = B.current()
            raise Started(name)

        return run

    monkeypatch.setattr(tasks.stages_copy, "run_copydetect", stage("copy"))
    monkeypatch.setattr(tasks.stages_decontam, "run_decontam", stage("decontam"))
    monkeypatch.setattr(tasks.stages_select, "run_cluster", stage("cluster"))
    monkeypatch.setattr(tasks, "run_retrieve", stage("retrieve"))
    monkeypatch.setattr(tasks, "_pool_vectors", lambda run: (10, 8))
    cfg, rcfg = CopyDetectConfig(), RunnerConfig()
    calls = {
        "copy": lambda: tasks.copydetect_task(tmp_path, cfg, rcfg, proposers=[], copy_model=None, budget=BUDGET),
        "decontam": lambda: tasks.decontam_task(tmp_path, {}, cfg, rcfg, proposer=None, copy_model=None, budget=BUDGET),
        "cluster": lambda: tasks.cluster_task(tmp_path, ClusterConfig(), rcfg, BUDGET),
        "retrieve": lambda: tasks.retrieve_task(tmp_path, {}, RetrieveConfig(), rcfg, BUDGET),
    }
    for name, call in calls.items():
        with pytest.raises(Started, match=name):
            flow(name=f"budget-{name}")(call)()
        assert seen[name] == BUDGET and B.current() is None


def test_actors_that_must_be_resident_at_once_share_the_cpus_or_are_refused(ray_local):
    """More shards than the cluster's CPUs would wait forever for a CPU: they share them instead;
    more memory than the cluster has is a clear error, not a hang."""
    cpus, memory = ray_local.cluster_resources()["CPU"], ray_local.cluster_resources()["memory"]
    assert B.resident_cpus(1.0, [None] * int(cpus)) == 1.0
    assert B.resident_cpus(1.0, [None] * int(4 * cpus)) == 0.25
    assert B.resident_cpus(0.25, [None] * int(4 * cpus)) == 0.25
    assert B.resident_cpus(1.0, [int(memory) // 8] * 4) == min(1.0, cpus / 4)
    with pytest.raises(RuntimeError, match="resident at once .* add nodes"):
        B.resident_cpus(1.0, [int(memory) // 2 + 1] * 2)
