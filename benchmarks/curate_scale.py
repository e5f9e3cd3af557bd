"""Partitioned global curation stages at 10^5, 10^6 and 10^7 images: wall time and the peak
memory of the driver and of every Ray worker, on 1 and 2 workers, and what that means for a
142M / 1.2B-image pool.

Pool: `lvd.curation.scale.synthetic` writes a run folder as ingest and embed would leave it
(hash records with 2% planted near-copy chains across partitions; d=128 float16 vectors in
256 clusters, in parts of 25,000 rows), once per size under `--pool-root` (kept for reruns).
Each (size, workers) runs in a fresh subprocess with its own local Ray of `num_cpus = workers`
(so no earlier run's heap or Ray worker lingers), and each stage there runs inside
`budget.PeakWatch`: the driver's and every Ray worker process's VmHWM (/proc/<pid>/status,
reset with clear_refs at the stage's start, polled every 50 ms so actors that exit are caught).
The partition sizes come from `--worker-memory` through `lvd.curation.scale.budget`.

Stages (each from the module that implements it; one that has not landed is reported missing):
hash dedup + connected components (scale.hashdedup / scale.components), sharded kNN
(scale.shardindex), distributed k-means (scale.dkmeans), the partitioned ledger (ledger), the
shard stage's plan (stages.shardplan).
"hash dedup sampled" (not in the default run) is for sizes where the whole hash dedup takes
longer than a session here: the exact pass in full, then a sample of the pair pass's real block
tasks (`--pair-tasks`, up to `--pair-max-blocks` blocks searched each), timed one by one; the
pair pass's worker-seconds projected from a fit of their seconds against blocks searched.
Baseline, same subprocess: the single-process path of the same work (`dedup.find_near_duplicates`
on the whole table, `lloyd.lloyd` on the whole pool, the row-by-row shard plan it replaced:
tests/curation/_shard_reference.py) for sizes up to `--baseline-max`: its peak
is what the driver held before (it grows with N; the partitioned driver's must not).

Sizing (printed last): workers and nodes from the budget formula (budget.cluster_size), CPU
hours from the measured worker-seconds per row extrapolated with the exponent measured between
the two largest sizes, GPU hours for embedding from a stated throughput; beside the paper's
20 nodes x 8 V100 in under 2 days for 1.2B images.

Run: .venv/bin/python benchmarks/curate_scale.py           # 3e4 and 1e5 on 1 and 2 workers, every stage
     .venv/bin/python benchmarks/curate_scale.py --sizes 1e5,1e6 --stages "sharded kNN,k-means,ledger"
     .venv/bin/python benchmarks/curate_scale.py --sizes 1e7 --workers 2 --stages "sharded kNN,k-means,ledger"
     .venv/bin/python benchmarks/curate_scale.py --sizes 1e5,1e6 --stages "hash dedup,components" --baseline-max 1e5
     .venv/bin/python benchmarks/curate_scale.py --sizes 1e7 --workers 2 --stages "hash dedup sampled" --baseline-max 0
     .venv/bin/python benchmarks/curate_scale.py --sizes 1e7 --workers 2 --stages "hash dedup" --hash-max 1e7 --baseline-max 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lvd.cli.options import add_scale_options
from lvd.curation.scale import budget as B
from lvd.curation.scale.synthetic import PoolSpec, write_pool

STAGES = ("hash dedup", "components", "sharded kNN", "k-means", "ledger", "shard plan", "pool order")
# not in the default run: the hash dedup where the whole of it takes longer than a session here
SAMPLED = ("hash dedup sampled",)
# also not in the default run: the cluster stage in one task and partitioned, and the retrieve
# stage's one task ("retrieve task" reads the clusters that either cluster stage leaves)
OPT_IN = (
    *SAMPLED,
    "cluster task",
    "cluster partitioned",
    "retrieve task",
    "retrieve partitioned",
    "retrieve seeds task",
    "retrieve seeds partitioned",
)
VECTOR_STAGES = {
    "retrieve seeds task",
    "retrieve seeds partitioned",
    "sharded kNN",
    "k-means",
    "cluster task",
    "cluster partitioned",
    "retrieve task",
    "retrieve partitioned",
}
KMEANS_K, KMEANS_ITERS, KNN_K = 256, 3, 16
KNN_QUERIES = 20_000  # queries searched against the whole sharded pool at every size
KNN_NLIST, KNN_NPROBE = 512, 8  # IVF lists fixed in N: the driver trains the quantiser on 64 * nlist rows


@dataclass(frozen=True)
class Ctx:
    run_dir: Path
    spec: PoolSpec
    budget: B.WorkerBudget
    workers: int
    hash_max: float = math.inf
    pair_tasks: int = 4
    pair_max_blocks: int = 12


class Skip(Exception):
    """A stage that cannot run at this size on this machine; the message says why."""


@dataclass
class Row:
    n: int
    workers: int
    stage: str
    wall_s: float | None
    driver_peak: int
    worker_peaks: list[int]  # one per Ray worker process that ran in the stage
    note: str = ""


# ---------------------------------------------------------------- stages


def stage_kmeans(ctx: Ctx) -> str:
    from lvd.curation.scale import dkmeans

    rows = B.kmeans_shard_rows(ctx.budget, ctx.spec.dim, KMEANS_K)
    n_actors = max(ctx.workers, math.ceil(ctx.spec.n / rows))
    res = dkmeans.cluster_vector_folder(
        ctx.run_dir / "vectors",
        KMEANS_K,
        n_actors=n_actors,
        niter=KMEANS_ITERS,
        out_dir=ctx.run_dir / "kmeans",
        actor_cpus=ctx.workers / n_actors,
    )
    return f"k={KMEANS_K}, {KMEANS_ITERS} iters, {n_actors} actors, inertia {res.inertia:.1f}"


def shuffle_config(ctx: Ctx, n_edges: int):
    """Exact buckets from the records' bytes, pair blocks from budget.hash_block_count (a
    block-pair task's measured peak per record of its block), under the worker budget."""
    from lvd.curation.scale.hashdedup import ShuffleConfig

    exact, blocks = B.hash_shuffle_sizes(ctx.spec.n, ctx.budget, min_buckets=2 * ctx.workers)
    return ShuffleConfig(
        buckets=blocks,
        exact_buckets=exact,
        partitions=max(2 * ctx.workers, B.component_partitions(n_edges, ctx.budget)),
        task_options=B.ray_options(ctx.budget),
    )


def stage_hashdedup(ctx: Ctx) -> str:
    """Bucketed hash dedup (with its connected components) into a scratch folder."""
    import shutil

    from lvd.curation.dedup import DedupConfig
    from lvd.curation.scale import hashdedup

    if ctx.spec.n > ctx.hash_max:
        raise Skip(f"skipped: above --hash-max {ctx.hash_max:.0e}")
    need = 2 * ctx.spec.n * B.HASH_RECORD_BYTES  # the exact pass's buckets and the blocks
    if need > shutil.disk_usage(ctx.run_dir).free * 0.8:
        raise Skip(f"skipped: its shuffle writes ~{B.format_bytes(need)}, over this disk's free space")
    work = ctx.run_dir / f"hashdedup-{ctx.workers}"
    shutil.rmtree(work, ignore_errors=True)
    rep = hashdedup.partitioned_duplicates(
        hashdedup.run_sources(ctx.run_dir), DedupConfig(), work, shuffle_config(ctx, ctx.spec.n)
    )
    return f"incl. components; {rep.records} records, {rep.edges} edges, {rep.phases} star phases"


def stage_hash_sampled(ctx: Ctx) -> list[Row]:
    """The hash dedup where running all of it does not fit (10^7 here: ~3 h of 2 cores), measured
    in two rows: the exact pass in full (`hashdedup.exact_pass`), then `ctx.pair_tasks` of the
    pair pass's block tasks, the real ones of this pool and budget (each task holds what it does
    in the full run: its block's indexes and one other block at a time), chosen with 1 ..
    `pair_max_blocks` blocks to search, spread over that range. Each task's seconds fit
    seconds = c0 + c1 x blocks searched (least squares); the pair pass's worker-seconds are that
    summed over every task of the plan, its wall on W workers worker-seconds / W. The connected
    components need every task's edges, so they are not run (their cost at 10^6: the
    "components" stage)."""
    import shutil

    from lvd.curation.dedup import DedupConfig
    from lvd.curation.scale import hashdedup

    need = 2 * ctx.spec.n * B.HASH_RECORD_BYTES
    if need > shutil.disk_usage(ctx.run_dir).free * 0.8:
        raise Skip(f"skipped: its shuffle writes ~{B.format_bytes(need)}, over this disk's free space")
    work = ctx.run_dir / f"hashdedup-sampled-{ctx.workers}"
    shutil.rmtree(work, ignore_errors=True)
    shuffle, cfg = shuffle_config(ctx, ctx.spec.n), DedupConfig()
    wall, watch, plan = measure(
        lambda c: hashdedup.exact_pass(hashdedup.run_sources(c.run_dir), cfg, work, shuffle), ctx
    )
    n_others = np.array([len(o) for o in plan.others])
    rows = [
        Row(ctx.spec.n, ctx.workers, "hash dedup: exact pass", wall, watch.driver,
            sorted(p for _, p in watch.workers.values()),
            f"{plan.records} records; {len(plan.blocks)} blocks, {plan.block_pairs} block pairs to search"),
    ]  # fmt: skip
    tasks = sample_tasks(n_others, ctx.pair_tasks, ctx.pair_max_blocks)
    wall, watch, done = measure(lambda c: hashdedup.pair_pass(plan, cfg, work, shuffle, tasks), ctx)
    secs = np.array([d[2] for d in done])
    x = n_others[tasks]
    c1, c0 = np.polyfit(x, secs, 1) if len(set(x.tolist())) > 1 else (secs.sum() / x.sum(), 0.0)
    total = float(np.sum(c0 + c1 * n_others))
    per = ", ".join(f"{k} blocks {s:.1f} s" for k, s in zip(x.tolist(), secs.tolist()))
    rows.append(Row(
        ctx.spec.n, ctx.workers, f"hash dedup: {len(tasks)} of {len(plan.blocks)} pair tasks", wall, watch.driver,
        sorted(p for _, p in watch.workers.values()),
        f"{per}; fit {c0:.1f} + {c1:.1f} s a block searched; the whole pair pass: ~{total:,.0f} worker-s, "
        f"~{total / ctx.workers / 3600:.1f} h on {ctx.workers} (projected, not run)",
    ))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return rows


def sample_tasks(n_others: np.ndarray, k: int, most: int) -> list[int]:
    """k block tasks whose blocks-to-search counts spread evenly over 1..`most` (the nearest
    unused task to each target), fewest first."""
    cap = int(min(most, n_others.max()))
    picked: list[int] = []
    for target in np.linspace(n_others.min(), cap, k):
        free = [j for j in np.argsort(np.abs(n_others - target), kind="stable").tolist() if j not in picked]
        if free and n_others[free[0]] <= cap:
            picked.append(free[0])
    return sorted(picked, key=lambda j: (n_others[j], j))


def stage_components(ctx: Ctx) -> str:
    """The connected components alone, again, over the edge partitions the hash stage wrote."""
    import shutil

    from lvd.curation.scale import components

    work = ctx.run_dir / f"hashdedup-{ctx.workers}"
    files = sorted((work / "edges").glob("*.parquet"))
    if not files:
        raise Skip("skipped: no edge partitions (the hash stage did not run)")
    edges = sum(pq.read_metadata(f).num_rows for f in files)
    cfg = components.ComponentsConfig(
        partitions=shuffle_config(ctx, edges).partitions, task_options=B.ray_options(ctx.budget)
    )
    rep = components.components(files, work / "components-again", cfg)
    shutil.rmtree(work, ignore_errors=True)  # the shuffle's scratch: GBs per 1e5 records
    return f"{edges} edges in {len(files)} parts, {cfg.partitions} partitions, {rep.phases} star phases"


def stage_knn(ctx: Ctx) -> str:
    """The k nearest pool vectors of KNN_QUERIES pool rows, over shard actors sized by the budget."""
    from lvd.curation.knn_index import IndexConfig
    from lvd.curation.scale import shardindex
    from lvd.curation.vectors import part_paths

    dim, n = ctx.spec.dim, ctx.spec.n
    index = "flat" if n < IndexConfig().exact_below else "ivf"
    rows = B.vector_shard_rows(ctx.budget, dim, index)
    shards = max(ctx.workers, math.ceil(n / rows))
    cfg = shardindex.ShardConfig(
        index=IndexConfig(nlist=KNN_NLIST, nprobe=KNN_NPROBE),
        rows_per_shard=math.ceil(n / shards),
        query_block=B.query_block_rows(ctx.budget, dim, KNN_K),
        num_cpus=ctx.workers / shards,
    )
    # part 0's first rows, read alone: open_vectors would hold every pool uid (64 B a row) in the driver
    first = np.load(part_paths(ctx.run_dir / "vectors", 0)[0], mmap_mode="r")[:KNN_QUERIES]
    with shardindex.build(ctx.run_dir / "vectors", cfg=cfg) as sharded:
        nb = sharded.neighbours(first.astype(np.float32), KNN_K)
        got = sharded.n_shards
    hit = float(np.mean(nb.ids_QK[:, 0] == np.arange(len(first))))
    return f"{index}, {got} shards, {len(first)} queries k={KNN_K}, self found first {hit:.3f}"


def stage_ledger(ctx: Ctx) -> str:
    from lvd.curation import ledger

    summary = ledger.write_parts(ctx.run_dir, range_rows=B.ledger_range_rows(ctx.budget))
    return f"{summary.parts} parts, {summary.rows} rows, {summary.by_status}"


def stage_shard_plan(ctx: Ctx) -> str:
    """What ships, planned by uid range (no selection in a synthetic pool: every candidate)."""
    import shutil

    from lvd.curation.stages import shardplan

    plan = shardplan.plan(ctx.run_dir, range_rows=B.shard_plan_range_rows(ctx.budget))
    shutil.rmtree(shardplan.work_dir(ctx.run_dir))
    return f"{plan.total} rows in {len(plan.files)} uid ranges"


def stage_pool_order(ctx: Ctx) -> str:
    """Copy detection's step 0 (scale.poolorder): the pool numbered in unique_accepted's order,
    the calibration sample drawn, and every ingest part's uids joined to their positions (as
    copy detection joins its copyfeat parts, one per ingest partition)."""
    import shutil

    from lvd.curation import rundir
    from lvd.curation.copydetect import CopyDetectConfig
    from lvd.curation.scale import poolorder
    from lvd.curation.scale.copyscale import CopyScaleConfig

    cfg, work = CopyDetectConfig(), ctx.run_dir / "poolorder"
    shutil.rmtree(work, ignore_errors=True)
    opts = {"num_cpus": 1, "max_retries": 3}
    with B.job_budget(ctx.budget):  # buckets and ranges: budget.order_records a task
        order = poolorder.number(
            ctx.run_dir, work, CopyScaleConfig().part_rows, opts, calib=(cfg.calib_images, cfg.seed)
        )
    parts = [(str(p), ["uid"], None) for p in rundir.ingest_manifests(ctx.run_dir)]
    poolorder.join(order, "ingest", parts, opts)
    last = poolorder.positions(work, "ingest", len(parts) - 1, pq.ParquetFile(parts[-1][0]).metadata.num_rows)[0]
    shutil.rmtree(work)
    assert (last >= 0).all()
    return f"{order.n} positions, {order.buckets} uid buckets, sample of {len(order.sample)}, {len(parts)} parts joined"


def baseline_pool_order(ctx: Ctx) -> str:
    """What copy detection's driver did before: the uid list, the calibration sample from it and
    the sorted uid -> position lookup that every scatter task was sent."""
    from lvd.curation import rundir
    from lvd.curation.copydetect import CopyDetectConfig, calibration_sample

    cfg = CopyDetectConfig()
    t = rundir.unique_accepted(ctx.run_dir, ["uid", "width", "height"])
    uids = t["uid"].to_pylist()
    sample = calibration_sample(uids, cfg.calib_images, cfg.seed)
    keys = np.array([u.encode() for u in uids], dtype=bytes)
    order = np.argsort(keys, kind="stable")
    lookup = (keys[order], order.astype(np.int64))
    return f"one process (the driver before), {len(uids)} uids, sample of {len(sample)}, lookup {lookup[0].nbytes + lookup[1].nbytes} B"


def stage_cluster_task(ctx: Ctx, partitioned: bool = False) -> str:
    """The product's cluster stage (`select.run_cluster`, engine "ray", a 2-level tree, k-means
    sized by the budget) in one task: its Lloyd runs on actors holding vector shards, while its
    one Ray task holds the candidates' uids, their assignments and the clusters table (per image)."""
    import shutil

    from lvd.curation import rundir
    from lvd.curation.stages import select

    cfg = select.ClusterConfig(
        k=KMEANS_K, niter=KMEANS_ITERS, engine="ray", hierarchical=True, levels=2, partitioned=partitioned
    )
    shutil.rmtree(rundir.stage_dir(ctx.run_dir, "cluster"), ignore_errors=True)
    with B.job_budget(ctx.budget):
        select.run_cluster(ctx.run_dir, cfg)
    rows = pq.ParquetFile(rundir.stage_dir(ctx.run_dir, "cluster") / "clusters.parquet").metadata.num_rows
    return f"{rows} images clustered, k={KMEANS_K}, 2 levels, {KMEANS_ITERS} iters (kept for 'retrieve task')"


def stage_cluster_partitioned(ctx: Ctx) -> str:
    """The same stage partitioned (`scale.pcluster`): candidates by uid-bucket tasks, the Lloyd's
    actors read their own rows and write the labels, one task merges clusters.parquet by uid range."""
    return stage_cluster_task(ctx, partitioned=True)


def stage_retrieve_task(ctx: Ctx, partitioned: bool = False) -> str:
    """The product's retrieve stage without seeds (`retrieve.run_retrieve`, balanced sampling of
    the cluster tree to a quarter of the pool, as LVD-142M's path) in one task: it holds the
    candidates' uids, the clusters table and the tree, and draws the sample (per image). The
    clusters stay for a later retrieve stage."""
    import shutil

    from lvd.curation import rundir
    from lvd.curation.stages import retrieve

    if not (rundir.stage_dir(ctx.run_dir, "cluster") / "clusters.parquet").is_file():
        raise Skip("needs the clusters: run 'cluster task' or 'cluster partitioned' before it in --stages")
    cfg = retrieve.RetrieveConfig(method="hierarchical", target=ctx.spec.n // 4, partitioned=partitioned)
    shutil.rmtree(rundir.stage_dir(ctx.run_dir, "retrieve"), ignore_errors=True)
    with B.job_budget(ctx.budget):
        retrieve.run_retrieve(ctx.run_dir, {}, cfg)
    rows = pq.ParquetFile(rundir.stage_dir(ctx.run_dir, "retrieve") / "selection.parquet").metadata.num_rows
    shutil.rmtree(rundir.stage_dir(ctx.run_dir, "retrieve"))
    return f"{rows} of {ctx.spec.n} images selected by balanced sampling of a 2-level tree"


def stage_retrieve_partitioned(ctx: Ctx) -> str:
    """The same balanced sampling partitioned (`scale.pretrieve`): chunk tasks, leaf-bucket tasks,
    one task merging the selection by uid range."""
    return stage_retrieve_task(ctx, partitioned=True)


SEED_FRACTION = 100  # the seed set: 1% of the pool (LVD-142M: ~14M ImageNet-22k seeds, a 1.2B pool)


def stage_retrieve_seeds_task(ctx: Ctx, partitioned: bool = False) -> str:
    """The retrieve stage with a seed set (sample-based, k=4: the paper's default and the flow's),
    in one task: it holds the candidates' uids, the seeds' vectors and every hit. The seed set is
    a synthetic run of N / 100 images drawn like the pool's first rows (written once, kept)."""
    import shutil

    from lvd.curation import rundir
    from lvd.curation.stages import retrieve

    if not (rundir.stage_dir(ctx.run_dir, "cluster") / "clusters.parquet").is_file():
        raise Skip("needs the clusters: run 'cluster task' or 'cluster partitioned' before it in --stages")
    spec = ctx.spec
    seeds = ctx.run_dir / "seeds" / "s"
    write_pool(PoolSpec(n=max(2, spec.n // SEED_FRACTION), dim=spec.dim, part_rows=spec.part_rows), seeds)
    cfg = retrieve.RetrieveConfig(method="sample", k=4, partitioned=partitioned)
    shutil.rmtree(rundir.stage_dir(ctx.run_dir, "retrieve"), ignore_errors=True)
    with B.job_budget(ctx.budget):
        retrieve.run_retrieve(ctx.run_dir, {"s": seeds}, cfg)
    rows = pq.ParquetFile(rundir.stage_dir(ctx.run_dir, "retrieve") / "selection.parquet").metadata.num_rows
    shutil.rmtree(rundir.stage_dir(ctx.run_dir, "retrieve"))
    return f"{rows} images retrieved by {spec.n // SEED_FRACTION} seeds (k=4)"


def stage_retrieve_seeds_partitioned(ctx: Ctx) -> str:
    """The same retrieval partitioned (`scale.pseeds`): candidates and seeds by uid buckets, a
    sharded index reading its own rows, seeds queried a chunk at a time, hits deduped by range."""
    return stage_retrieve_seeds_task(ctx, partitioned=True)


def baseline_kmeans(ctx: Ctx) -> str:
    from lvd.curation import lloyd
    from lvd.curation.vectors import open_vectors

    x16 = open_vectors(ctx.run_dir / "vectors").load().vecs_ND
    res = lloyd.lloyd(x16, lloyd.LloydConfig(k=KMEANS_K, niter=KMEANS_ITERS))
    return f"one process, inertia {res.inertia:.1f}"


def baseline_dedup(ctx: Ctx) -> str:
    from lvd.curation import rundir
    from lvd.curation.dedup import DedupConfig, find_near_duplicates

    dups = find_near_duplicates(rundir.unique_accepted(ctx.run_dir), DedupConfig())
    return f"one process, {dups.num_rows} duplicates"


def baseline_shard_plan(ctx: Ctx) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "curation"))
    from _shard_reference import shard_rows

    return f"one process (the row-by-row plan before), {len(shard_rows(ctx.run_dir))} rows"


STAGE_FNS = {
    "hash dedup": stage_hashdedup,
    "hash dedup sampled": stage_hash_sampled,
    "components": stage_components,
    "sharded kNN": stage_knn,
    "k-means": stage_kmeans,
    "ledger": stage_ledger,
    "shard plan": stage_shard_plan,
    "pool order": stage_pool_order,
    "cluster task": stage_cluster_task,
    "cluster partitioned": stage_cluster_partitioned,
    "retrieve partitioned": stage_retrieve_partitioned,
    "retrieve task": stage_retrieve_task,
    "retrieve seeds task": stage_retrieve_seeds_task,
    "retrieve seeds partitioned": stage_retrieve_seeds_partitioned,
}
BASELINES = {
    "hash dedup": baseline_dedup,
    "k-means": baseline_kmeans,
    "shard plan": baseline_shard_plan,
    "pool order": baseline_pool_order,
}


# ---------------------------------------------------------------- one (size, workers) run


def measure(fn, ctx: Ctx) -> tuple[float, B.PeakWatch, str]:
    with B.PeakWatch() as watch:
        t0 = time.perf_counter()
        note = fn(ctx)
        wall = time.perf_counter() - t0
    return wall, watch, note


def run_one(
    run_dir: Path,
    spec: PoolSpec,
    workers: int,
    worker_memory: int,
    baseline: bool,
    stages: list[str],
    hash_max: float = math.inf,
    pair_tasks: int = 4,
    pair_max_blocks: int = 12,
) -> list[Row]:
    """Every stage on one pool under a fresh local Ray of `workers` CPUs (this is the subprocess)."""
    import ray

    ctx = Ctx(run_dir, spec, B.WorkerBudget(worker_memory), workers, hash_max, pair_tasks, pair_max_blocks)
    ray.init(
        address="local",
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * B.MiB,
    )
    rows = []
    try:
        for stage in stages:
            fn = STAGE_FNS.get(stage)
            if fn is None:
                rows.append(Row(spec.n, workers, stage, None, 0, [], "missing: its module has not landed"))
                continue
            try:
                if stage in SAMPLED:  # its own rows, each with its own peaks
                    rows += fn(ctx)
                    continue
                wall, w, note = measure(fn, ctx)
            except Skip as e:
                rows.append(Row(spec.n, workers, stage, None, 0, [], str(e)))
                continue
            rows.append(Row(spec.n, workers, stage, wall, w.driver, sorted(p for _, p in w.workers.values()), note))
    finally:
        ray.shutdown()
    if baseline:
        for stage, fn in ((s, f) for s, f in BASELINES.items() if s in stages):
            wall, w, note = measure(fn, ctx)
            rows.append(Row(spec.n, 0, f"{stage} (baseline)", wall, w.driver, [], note))
    return rows


def spawn(args, n: int, workers: int, baseline: bool) -> list[Row]:
    cmd = [sys.executable, __file__, "--one", str(n), str(workers), "--pool-root", str(args.pool_root)]
    cmd += ["--worker-memory", str(args.worker_memory), "--baseline-max", str(n if baseline else 0)]
    cmd += ["--dim", str(args.dim), "--part-rows", str(args.part_rows), "--stages", args.stages]
    cmd += ["--hash-max", str(args.hash_max), "--pair-tasks", str(args.pair_tasks)]
    cmd += ["--pair-max-blocks", str(args.pair_max_blocks)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"size {n} on {workers} workers failed:\n{res.stderr[-3000:]}")
    return [Row(**r) for r in json.loads(lines[0][len("RESULT ") :])]


def pool_spec(args, n: int) -> PoolSpec:
    return PoolSpec(n=n, dim=args.dim, part_rows=args.part_rows)


def pool_dir(root: Path, spec: PoolSpec) -> Path:
    default = spec.dim == PoolSpec(n=2).dim and spec.part_rows == PoolSpec(n=2).part_rows
    suffix = "" if default else f"-d{spec.dim}-p{spec.part_rows}"
    return Path(root) / (f"pool-{spec.n:.0e}".replace("+0", "") + suffix)


# ---------------------------------------------------------------- report


def mib(b: float) -> str:
    return f"{b / B.MiB:,.0f}"


def print_table(rows: list[Row], budget: B.WorkerBudget) -> None:
    print(f"\nworker budget {B.format_bytes(budget.worker_bytes)} (data share {B.format_bytes(budget.data_bytes)})\n")
    print("| N | workers | stage | wall s | driver peak MiB | worker peaks MiB | max worker / budget | note |")
    print("|---:|---:|---|---:|---:|---|---:|---|")
    for r in rows:
        if r.wall_s is None:
            print(f"| {r.n:.0e} | {r.workers} | {r.stage} | - | - | - | - | {r.note} |")
            continue
        peaks = ", ".join(mib(p) for p in r.worker_peaks) or "-"
        frac = f"{max(r.worker_peaks) / budget.worker_bytes:.2f}" if r.worker_peaks else "-"
        workers = r.workers or "driver only"
        print(
            f"| {r.n:.0e} | {workers} | {r.stage} | {r.wall_s:.1f} | {mib(r.driver_peak)} | {peaks} | {frac} | {r.note} |"
        )


def print_growth(rows: list[Row]) -> None:
    """Driver peak per size (flat?) and the largest worker peak per size and worker count."""
    done = [r for r in rows if r.wall_s is not None and r.workers]
    sizes = sorted({r.n for r in done})
    if len(sizes) < 2:
        return
    print("\nPeak RSS against N (max over the partitioned stages; MiB):\n")
    print("| N | driver | max worker, 1 worker | max worker, 2 workers | baseline (one process) |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        at = [r for r in done if r.n == n]
        base = [r.driver_peak for r in rows if r.n == n and not r.workers]
        cells = [max(r.driver_peak for r in at)]
        for w in (1, 2):
            cells.append(max((max(r.worker_peaks, default=0) for r in at if r.workers == w), default=0))
        print(
            f"| {n:.0e} | "
            + " | ".join(mib(c) if c else "-" for c in cells)
            + f" | {mib(max(base)) if base else '-'} |"
        )


# ---------------------------------------------------------------- sizing


def cpu_rate(rows: list[Row], stage: str) -> tuple[float, float, int] | None:
    """(worker-seconds per row at the largest size, growth exponent, that size) of a stage."""
    pts = sorted((r.n, r.wall_s * r.workers) for r in rows if r.stage == stage and r.wall_s and r.workers)
    if not pts:
        return None
    n1, c1 = pts[-1]
    smaller = [p for p in pts if p[0] < n1]
    slope = math.log(c1 / smaller[-1][1]) / math.log(n1 / smaller[-1][0]) if smaller else 1.0
    return c1 / n1, max(1.0, slope), n1


def print_sizing(rows: list[Row], args) -> None:
    """Nodes, GPUs and hours for 142M and 1.2B images, next to the paper's 20 x 8 V100."""
    b = B.WorkerBudget(B.parse_bytes(args.node_worker_memory))
    print(
        f"\nSizing (formula in lvd/curation/scale/budget.py): D={args.dim_at_scale} fp16 vectors, IVF-PQ "
        f"{args.pq_bytes} B codes; worker budget {B.format_bytes(b.worker_bytes)}; node = "
        f"{args.node_cores} cores, {B.format_bytes(B.parse_bytes(args.node_memory))}, {args.gpus_per_node} GPUs; "
        f"embedding at {args.gpu_images_per_s} img/s per GPU (estimate, not measured here); "
        f"CPU stages from this run's worker-seconds per row, times (N / N_measured)^(slope - 1)\n"
    )
    print("| pool | index | vector bytes | workers | nodes (memory) | CPU stages core-h | nodes for 48 h | "
          "embed GPU-h | GPUs | total h on those nodes |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (142_000_000, 1_200_000_000):
        core_h = 0.0
        for stage in (s for s in STAGES if s != "components"):  # the hash dedup stage includes them
            if rate := cpu_rate(rows, stage):
                per_row, slope, n0 = rate
                core_h += per_row * n * (n / n0) ** (slope - 1) / 3600
        gpu_h = n / args.gpu_images_per_s / 3600
        for index, pq_bytes in (("flat", 0), ("ivfpq", args.pq_bytes)):
            size = B.cluster_size(
                n, args.dim_at_scale, b, node_memory=B.parse_bytes(args.node_memory), node_cores=args.node_cores,
                index=index, pq_bytes=pq_bytes,
            )  # fmt: skip
            nodes = max(
                size.nodes, math.ceil(core_h / 48 / args.node_cores), math.ceil(gpu_h / 48 / args.gpus_per_node)
            )
            gpus = nodes * args.gpus_per_node
            hours = core_h / (nodes * args.node_cores) + gpu_h / gpus
            print(
                f"| {n / 1e6:,.0f}M | {index} | {B.format_bytes(size.vector_bytes)} | {size.workers} | {size.nodes} | "
                f"{core_h:,.0f} | {nodes} | {gpu_h:,.0f} | {gpus} | {hours:.1f} |"
            )
    print("| 1,200M | paper (Oquab et al. 2023) | | | | | 20 | | 160 V100 | < 48 |")


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="3e4,1e5", help="pool sizes, comma-separated (1e5,1e6,1e7)")
    p.add_argument("--hash-max", type=float, default=1e6, help="run hash dedup + components up to this size")
    p.add_argument("--workers", default="1,2", help="Ray CPUs (workers) per run, comma-separated")
    add_scale_options(p, default="3GiB")
    p.add_argument("--pool-root", type=Path, default=Path("/tmp/lvd-curate-scale"), help="where pools are kept")
    p.add_argument("--baseline-max", type=float, default=1e6, help="run the one-process baseline up to this size")
    p.add_argument("--dim", type=int, default=128, help="vector dimension of the synthetic pool")
    p.add_argument("--part-rows", type=int, default=25_000, help="rows per ingest / vector part of the pool")
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"stages to run, comma-separated ({', '.join(STAGES + OPT_IN)})"
    )
    p.add_argument("--pair-tasks", type=int, default=4, help="'hash dedup sampled': block tasks run")
    p.add_argument(
        "--pair-max-blocks", type=int, default=12, help="'hash dedup sampled': most blocks a sampled task searches"
    )
    p.add_argument("--one", nargs=2, type=float, metavar=("N", "WORKERS"), help=argparse.SUPPRESS)
    g = p.add_argument_group("sizing table")
    g.add_argument(
        "--dim-at-scale", type=int, default=1024, help="embedding dim (ViT-L: 1024; the paper's ViT-H: 1280)"
    )
    g.add_argument("--pq-bytes", type=int, default=64, help="IVF-PQ code bytes per vector")
    g.add_argument("--node-worker-memory", default="16GiB", help="budget per worker on the sized cluster")
    g.add_argument("--node-memory", default="512GiB", help="RAM per node")
    g.add_argument("--node-cores", type=int, default=64, help="CPU cores per node")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    g.add_argument("--gpu-images-per-s", type=float, default=300.0,
                   help="embedding throughput per GPU (V100 fp16, ViT-L/14 at 224 px: ~160 GFLOP/img at ~50 TFLOP/s)")  # fmt: skip
    args = p.parse_args()
    if args.one:
        n, workers = int(args.one[0]), int(args.one[1])
        spec = pool_spec(args, n)
        stages = [s for s in args.stages.split(",") if s]
        rows = run_one(
            pool_dir(args.pool_root, spec),
            spec,
            workers,
            args.worker_memory,
            n <= args.baseline_max,
            stages,
            args.hash_max,
            args.pair_tasks,
            args.pair_max_blocks,
        )
        print("RESULT " + json.dumps([asdict(r) for r in rows]))
        return
    unknown = set(args.stages.split(",")) - set(STAGES + OPT_IN)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; use some of {', '.join(STAGES + OPT_IN)}")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows: list[Row] = []
    for n in sizes:
        t0 = time.perf_counter()
        spec = pool_spec(args, n)
        write_pool(spec, pool_dir(args.pool_root, spec), vectors_too=bool(VECTOR_STAGES & set(args.stages.split(","))))
        print(f"pool {n:.0e}: {pool_dir(args.pool_root, spec)} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for i, w in enumerate(workers):
            rows += spawn(args, n, w, baseline=i == 0 and n <= args.baseline_max)
            print(f"  {n:.0e} on {w} workers done", flush=True)
    print_table(rows, B.WorkerBudget(args.worker_memory))
    print_growth(rows)
    print_sizing(rows, args)


if __name__ == "__main__":
    main()
