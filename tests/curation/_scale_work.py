"""The partitioned global stages on one run folder, as a script the scale tests run in a
subprocess (a driver they can SIGKILL, or one that owns a `ray.cluster_utils.Cluster`).

    python _scale_work.py RUN OUT [--address ADDR] [--budget 600MiB] [--resume] [--cluster-removal]

Stages, in order, each leaving its result under OUT (compared between runs by the tests):
  hash dedup  scale.hashdedup.partitioned_duplicates -> OUT/duplicates.parquet (also RUN/dedup/,
              where the ledger reads it)
  k-means     scale.dkmeans over the vector parts   -> OUT/centroids.npy, OUT/labels.parquet
  cluster     the cluster stage, partitioned (scale.pcluster), a 2-level tree -> OUT/clusters.parquet,
              OUT/clusters.tree.parquet; and the single-process Lloyd on the candidates in store-row
              order -> OUT/clusters.lloyd.parquet (uid, leaf)
  retrieve    balanced sampling to a quarter of the pool, partitioned (scale.pretrieve), run last
              (the ledger and shard plan above ship every candidate) -> OUT/selection.parquet; and
              the same draw in one process -> OUT/selection.one.parquet (uid)
  retrieve seeds  retrieval by a seed set (200 synthetic images, RUN/seeds/s), sample based, k=4,
              capped at a twentieth of the candidates, partitioned (scale.pseeds, an exact index), run last
              -> OUT/seedsel.parquet; and the one task's table (stages.retrieve.RetrieveFn, in
              this process, after) -> OUT/seedsel.one.parquet
  kNN         scale.shardindex exact, 300 queries   -> OUT/knn_ids.npy, OUT/knn_sims.npy
  ledger      ledger.write_parts                    -> OUT/ledger.parquet (read_ledger)
  shard plan  stages.shardplan, ranges of <= 1,500  -> OUT/shardplan.parquet (the plan files' rows,
              without blob_run and blob_file: the run folder's paths)
Partition sizes come from the budget (lvd.curation.scale.budget). OUT/<stage>.started is
written when a stage starts and OUT/<stage>.done when its outputs are written, so a test knows
where a run is. With --cluster-removal the script starts a Cluster (head without CPUs, 3 worker
nodes of 1 CPU), runs every stage once into OUT/reference, then again into OUT with one worker
node removed (and a fresh one added) while each stage runs, and prints RESULT {json} with the
times of removal and of each stage.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lvd.curation import ledger, rundir
from lvd.curation.dedup import DedupConfig
from lvd.curation.scale import budget as B

STAGES = ("hash dedup", "k-means", "cluster", "kNN", "ledger", "shard plan", "retrieve", "retrieve seeds")
K, NITER, KNN_K, QUERIES = 8, 6, 5, 300


def hash_dedup(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.scale import hashdedup

    n = sum(pq.read_metadata(p).num_rows for p in rundir.ingest_manifests(run))
    shuffle = hashdedup.ShuffleConfig(
        buckets=max(3, B.hash_block_count(n, b)),
        exact_buckets=max(3, B.hash_bucket_count(n, b)),
        partitions=max(3, B.component_partitions(n, b)),
        task_options=B.ray_options(b),
    )
    rep = hashdedup.partitioned_duplicates(hashdedup.run_sources(run), DedupConfig(), run / "hashwork", shuffle)
    table = pq.read_table(rep.duplicates)
    (run / "dedup").mkdir(exist_ok=True)
    pq.write_table(table, run / "dedup" / "duplicates.parquet")
    pq.write_table(table, out / "duplicates.parquet")


def kmeans(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.lloyd import LloydConfig
    from lvd.curation.scale import dkmeans

    n = sum(np.load(p, mmap_mode="r").shape[0] for p in (run / "vectors").glob("part-*.npy"))
    dim = np.load(next((run / "vectors").glob("part-*.npy")), mmap_mode="r").shape[1]
    n_actors = max(3, math.ceil(n / B.kmeans_shard_rows(b, dim, K)))
    cfg = dkmeans.DKMeansConfig(lloyd=LloydConfig(k=K, niter=NITER, seed=1), n_actors=n_actors, actor_cpus=0.25)
    res = dkmeans.dkmeans(run / "vectors", cfg, out_dir=run / "kmeans")
    np.save(out / "centroids.npy", res.centroids_KD)
    labels = pa.concat_tables([pq.read_table(p) for p in sorted((run / "kmeans").glob("labels-*.parquet"))])
    pq.write_table(labels, out / "labels.parquet")


def cluster(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.lloyd import lloyd
    from lvd.curation.stages import select
    from lvd.curation.vectors import open_vectors

    cfg = select.ClusterConfig(k=K, niter=NITER, seed=1, hierarchical=True, levels=2, partitioned=True)
    with B.job_budget(b):
        select.run_cluster(run, cfg)
    table, tree = rundir.clusters(run)
    pq.write_table(table, out / "clusters.parquet")
    pq.write_table(tree, out / "clusters.tree.parquet")
    store, uids = open_vectors(run / "vectors"), rundir.candidates(run)
    rows = np.sort(store.rows(uids))
    one = lloyd(store.take(rows), cfg.lloyd(K))
    pq.write_table(pa.table({"uid": store.uids[rows].tolist(), "leaf": one.assign_N}), out / "clusters.lloyd.parquet")


def retrieve(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.hierarchical import uid_keys
    from lvd.curation.retrieve import BalancedConfig, balanced
    from lvd.curation.stages import retrieve as stage
    from lvd.curation.stages.select import read_clusters

    table, tree = read_clusters(run)
    cfg = stage.RetrieveConfig(method="hierarchical", target=table.num_rows // 4, seed=2, partitioned=True)
    with B.job_budget(b):
        stage.run_retrieve(run, {}, cfg)
    pq.write_table(rundir.selection(run), out / "selection.parquet")
    uids = table["uid"].to_pylist()
    one = balanced(tree, BalancedConfig(target=cfg.target, seed=cfg.seed), uid_keys(uids, cfg.seed))
    pq.write_table(pa.table({"uid": [uids[i] for i in one.pool_idx.tolist()]}), out / "selection.one.parquet")


def retrieve_seeds(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation import runner
    from lvd.curation.scale import shardindex
    from lvd.curation.scale.synthetic import PoolSpec, write_pool
    from lvd.curation.stages import retrieve as stage
    from lvd.curation.vectors import open_vectors

    dim = open_vectors(run / "vectors").dim
    seeds = {"s": write_pool(PoolSpec(n=200, dim=dim, part_rows=80, centres=16, seed=5), run / "seeds" / "s")}
    knn = shardindex.ShardConfig(mode="exact", num_cpus=0.25)
    n = len(rundir.candidates(run))
    cfg = stage.RetrieveConfig(method="sample", k=4, target=n // 20, partitioned=True, knn=knn)
    with B.job_budget(b):
        stage.run_retrieve(run, seeds, cfg)
    pq.write_table(rundir.selection(run), out / "seedsel.parquet")
    unit = runner.WholeStage(fingerprint="one", stem="selection")
    one = stage.RetrieveFn(str(run), {k: str(v) for k, v in seeds.items()}, cfg)(unit)[""]
    pq.write_table(one, out / "seedsel.one.parquet")


def knn(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.scale import shardindex
    from lvd.curation.vectors import open_vectors

    store = open_vectors(run / "vectors")
    rows = B.vector_shard_rows(b, store.dim, "flat")
    cfg = shardindex.ShardConfig(
        mode="exact",
        rows_per_shard=max(1, min(rows, math.ceil(len(store) / 3))),
        query_block=min(100, B.query_block_rows(b, store.dim, KNN_K)),
        num_cpus=0.25,
    )
    queries = store.take(np.arange(0, len(store), max(1, len(store) // QUERIES))).astype(np.float32)
    with shardindex.build(run / "vectors", cfg=cfg) as index:
        nb = index.neighbours(queries, KNN_K)
    np.save(out / "knn_ids.npy", nb.ids_QK)
    np.save(out / "knn_sims.npy", nb.sims_QK)


def write_ledger(run: Path, out: Path, b: B.WorkerBudget) -> None:
    ledger.write_parts(run, range_rows=min(2_000, B.ledger_range_rows(b)))
    pq.write_table(ledger.read_ledger(run), out / "ledger.parquet")


def shard_plan(run: Path, out: Path, b: B.WorkerBudget) -> None:
    from lvd.curation.stages import shardplan

    plan = shardplan.plan(run, range_rows=min(1_500, B.shard_plan_range_rows(b)))
    rows = pa.concat_tables([pq.read_table(f) for f in plan.files]).drop_columns(["blob_run", "blob_file"])
    pq.write_table(rows, out / "shardplan.parquet")
    shutil.rmtree(shardplan.work_dir(run))


FNS = {
    "hash dedup": hash_dedup,
    "k-means": kmeans,
    "cluster": cluster,
    "kNN": knn,
    "ledger": write_ledger,
    "shard plan": shard_plan,
    "retrieve": retrieve,
    "retrieve seeds": retrieve_seeds,
}


TABLES = (
    "duplicates",
    "labels",
    "clusters",
    "clusters.tree",
    "selection",
    "ledger",
    "shardplan",
    "seedsel",
)  # OUT/<name>.parquet
ARRAYS = ("centroids", "knn_ids", "knn_sims")  # OUT/<name>.npy


def assert_same_outputs(out: Path, ref: Path) -> None:
    """Every stage's outputs under `out` equal those under `ref`, byte for byte as tables / arrays."""
    for name in TABLES:
        assert pq.read_table(out / f"{name}.parquet").equals(pq.read_table(ref / f"{name}.parquet")), name
    for name in ARRAYS:
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(ref / f"{name}.npy"), err_msg=name)


def run_stages(
    run: Path, out: Path, b: B.WorkerBudget, before=None, after=None, resume: bool = False
) -> dict[str, tuple[float, float]]:
    """Every stage in order (with `resume`, those without OUT/<stage>.done, as a flow skips
    finished stages); returns {stage: (start, end)} (time.time())."""
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    for stage in STAGES:
        if resume and (out / f"{stage}.done").exists():
            continue
        (out / f"{stage}.started").touch()
        if before:
            before(stage)
        t0 = time.time()
        FNS[stage](run, out, b)
        times[stage] = (t0, time.time())
        if after:
            after(stage)
        (out / f"{stage}.done").touch()
    return times


def with_node_removal(run: Path, out: Path, b: B.WorkerBudget) -> dict:
    """Reference run, then a run that loses a worker node in the middle of every stage. The
    stage runs in a thread: Ray adds nodes from the main thread only (signal handlers)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        ref_run = run.with_name(run.name + "-reference")
        shutil.copytree(run, ref_run)
        ref = run_stages(ref_run, out / "reference", b)
        out.mkdir(parents=True, exist_ok=True)
        removed, faulted = {}, {}
        for stage in STAGES:
            start, end = ref[stage]
            # at most 0.5 s in: the reference's first stage includes the workers' start-up
            # (hash dedup: 3.4 s there, 1.2 s here), so 0.4 of its wall could land after the end.
            # A stage that ends before its node goes (a loaded machine) runs again, the node
            # removed sooner: its outputs are rewritten, and must still equal the reference's.
            delay = min(0.4 * (end - start), 0.5)
            for _ in range(4):
                failed: list[BaseException] = []
                worker = threading.Thread(target=_stage_in_thread, args=(stage, run, out, b, faulted, failed))
                worker.start()
                time.sleep(delay)
                if worker.is_alive():
                    cluster.remove_node(nodes.pop(0))  # its tasks and actors die with it
                    removed[stage] = time.time()
                    nodes.append(cluster.add_node(num_cpus=1))  # capacity back for retries / restarts
                worker.join()
                if failed:
                    raise failed[0]
                if stage in removed and removed[stage] < faulted[stage][1]:
                    break
                delay /= 2
        return {"reference": ref, "faulted": faulted, "removed": removed}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _stage_in_thread(stage: str, run: Path, out: Path, b: B.WorkerBudget, times: dict, failed: list) -> None:
    try:
        t0 = time.time()
        FNS[stage](run, out, b)
        times[stage] = (t0, time.time())
    except BaseException as e:  # re-raised by the main thread
        failed.append(e)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--address", default=None)
    p.add_argument("--budget", default="600MiB")
    p.add_argument("--cluster-removal", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip the stages OUT/<stage>.done marks finished")
    args = p.parse_args()
    b = B.WorkerBudget(B.parse_bytes(args.budget))
    if args.cluster_removal:
        print("RESULT " + json.dumps(with_node_removal(args.run, args.out, b)), flush=True)
        return
    from lvd.curation import runner

    runner.init_ray(args.address)  # as `lvd curate --ray-address` joins (loopback kept loopback)
    times = run_stages(args.run, args.out, b, resume=args.resume)
    print("RESULT " + json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
