"""Spherical k-means over Ray actors that each hold one shard of a vector folder.

The pool's float16 vectors stay in their per-partition parts (`lvd.curation.vectors`); no process
concatenates them. Each actor loads one shard (a block-aligned range of pool rows, read from the
parts' memory maps) and keeps it in RAM. Every Lloyd iteration the driver puts the centroids in
the object store once, each actor returns its per-cluster partial sums, counts and inertia
(`lloyd.Partials`, k x D int64 + k counts), and the driver reduces them and renormalises
(`lloyd.update`). Because the sums are exact integers and every row is scored in the same BLAS
call wherever it lives, the result equals `lloyd.lloyd` in one process bit for bit from the same
initial centroids (and same `block_rows`), whatever the number of actors. Initial centroids come
from a seeded sample that the actors holding those rows send (k-means++ on the sample, or k
random rows). An actor killed with its node is restarted by Ray (`max_restarts`), reloads its
shard, and the iteration's call is retried: the partials are a pure function of shard and
centroids, so the result does not change.

Memory per actor: rows x (2D + 8) bytes (its shard, plus the last pass's int32 cluster and
float32 score) + one block's scratch, about block_rows x (4k + 14D) bytes
(`lloyd.default_block_rows` keeps it within ~64 MiB) + 20kD bytes (float32 centroids, int64
sums, the block's float64 group sums at most). Driver: ~32kD bytes (centroids,
the running int64 sum and the actor answer being added), plus the init sample
(`init_sample` x 8D); the labels come back only when asked (12 bytes per row; with `out_dir`
each actor writes its own Parquet part and the driver holds none).

Under a worker budget (`DKMeansConfig.budget`, else the job's `budget.current()`, set from
`--worker-memory`) an actor holds at most `budget.kmeans_shard_rows` rows (whole blocks), so the
number of actors follows from the pool and the budget, and each actor asks Ray for the memory it
will hold (`budget.kmeans_actor_memory` of its rows, at most the budget). The result does not
depend on the number of actors.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lvd.curation import lloyd
from lvd.curation.scale import budget as B
from lvd.curation.scale.pcluster import CandidateRows, write_ranges
from lvd.curation.vectors import folder_parts


@dataclass(frozen=True, kw_only=True)
class DKMeansConfig:
    lloyd: lloyd.LloydConfig  # k, iterations, seeding, block size: the single-process reference's config
    n_actors: int | None = None  # None: N / rows_per_actor when given, else one per CPU of the cluster
    rows_per_actor: int | None = None  # most rows one actor holds (rounded up to whole blocks)
    actor_cpus: float = 1.0  # CPUs each actor reserves
    max_restarts: int = 2  # Ray restarts an actor lost with its node this often (it reloads its shard)
    budget: B.WorkerBudget | None = None  # per-worker memory budget; None: the job's (`budget.current()`)

    def __post_init__(self):
        if isinstance(self.budget, (int, str)):
            object.__setattr__(self, "budget", B.WorkerBudget.parse(self.budget))
        if self.n_actors is not None and self.n_actors < 1:
            raise ValueError(f"n_actors={self.n_actors}: use at least 1, or None")
        if self.rows_per_actor is not None and self.rows_per_actor < 1:
            raise ValueError(f"rows_per_actor={self.rows_per_actor}: use at least 1 row, or None")
        if self.actor_cpus < 0:
            raise ValueError(f"actor_cpus={self.actor_cpus}: use 0 or more")


@dataclass(frozen=True)
class ShardSpec:
    """Pool rows `first .. first + n` (block-aligned), found in the parts `npys` whose first store
    rows are `offsets`; `store_rows` maps them to store rows when the pool is a subset (None: the
    pool is the whole folder, pool row = store row), or `candidates` does, read by the actor
    (`scale.pcluster`: the driver holds no row of the pool)."""

    first: int
    n: int
    npys: tuple[str, ...]
    offsets: tuple[int, ...]
    store_rows: np.ndarray | None = None
    candidates: CandidateRows | None = None

    def pool_rows(self) -> np.ndarray:
        """The store rows of this shard's pool rows."""
        if self.candidates is not None:
            return self.candidates.rows(self.first, self.n)
        if self.store_rows is not None:
            return self.store_rows
        return np.arange(self.first, self.first + self.n)


@dataclass(frozen=True)
class ActorStats:
    rows: int
    peak_rss_bytes: int  # the actor process's peak resident set (ru_maxrss)
    node: str
    memory: int = 0  # Ray's `memory` resource assigned to the actor (0: none asked, no budget)


@dataclass(frozen=True)
class DKMeansResult:
    centroids_KD: np.ndarray  # float32 unit rows
    sizes_K: np.ndarray  # int64 rows per cluster
    inertia: float  # sum of squared distances to the assigned centroids
    similarity: float  # sum of cosines to the assigned centroids
    assign_N: np.ndarray | None  # int64 cluster per pool row (None when written to out_dir)
    score_N: np.ndarray | None  # float32 cosine to it
    actors: tuple[ActorStats, ...] = field(default=())


def plan_shards(npys, counts, n_shards: int, block_rows: int, store_rows=None, candidates=None) -> list[ShardSpec]:
    """At most `n_shards` consecutive, block-aligned ranges of the pool's rows."""
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(counts)[:-1]]))
    n = _pool_size(counts, store_rows, candidates)
    per = max(1, math.ceil(math.ceil(n / max(1, n_shards)) / block_rows)) * block_rows
    specs = []
    for first in range(0, n, per):
        rows = None if store_rows is None else np.asarray(store_rows[first : first + per], np.int64)
        specs.append(ShardSpec(first, min(per, n - first), tuple(npys), offsets, rows, candidates))
    return specs


def _pool_size(counts, store_rows, candidates) -> int:
    if candidates is not None:
        return candidates.n
    return int(np.sum(counts)) if store_rows is None else len(store_rows)


def load_shard(spec: ShardSpec) -> np.ndarray:
    """float16 [n, D] rows of one shard, read part by part from the memory maps."""
    rows = spec.pool_rows()
    part = np.searchsorted(spec.offsets, rows, side="right") - 1
    out = None
    for p in np.unique(part):
        mm = np.load(spec.npys[p], mmap_mode="r")
        out = np.empty((len(rows), mm.shape[1]), np.float16) if out is None else out
        sel = part == p
        out[sel] = mm[rows[sel] - spec.offsets[p]]
    return out


class ShardActor:
    """One shard in RAM; answers the driver's per-iteration calls (`lloyd.Shard`)."""

    def __init__(self, spec: ShardSpec, block_rows: int):
        self.spec = spec
        self.shard = lloyd.Shard(load_shard(spec), spec.first, block_rows)

    def partials(self, c32_KD: np.ndarray) -> lloyd.Partials:
        return self.shard.partials(c32_KD)

    def farthest(self, m: int) -> lloyd.Farthest:
        return self.shard.farthest(m)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.shard.take(rows)

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.assign_N, self.shard.score_N

    def write_labels(self, path: str) -> int:
        """The last pass's labels as one Parquet part: `row` (pool row), `uid` (from the parts'
        uids files), `cluster`, `score`; returns the rows written."""
        rows = np.arange(self.spec.first, self.spec.first + self.spec.n)
        table = pa.table(
            {
                "row": pa.array(rows),
                "uid": pa.array(self._uids(), pa.string()),
                "cluster": pa.array(self.shard.assign_N.astype(np.int64)),
                "score": pa.array(self.shard.score_N),
            }
        )
        pq.write_table(table, path)
        return len(rows)

    def _uids(self) -> list[str]:
        spec = self.spec
        rows = spec.pool_rows()
        part = np.searchsorted(spec.offsets, rows, side="right") - 1
        out = np.empty(len(rows), object)
        for p in np.unique(part):
            uid_file = Path(spec.npys[p]).with_suffix(".uids.parquet")
            uids = pq.read_table(uid_file, columns=["uid"])["uid"].to_numpy(zero_copy_only=False)
            out[part == p] = uids[rows[part == p] - spec.offsets[p]]
        return out.tolist()

    def write_ranges(self, work: str, index: int, ups: list[np.ndarray], bounds: tuple[str, ...]) -> int:
        """The last pass's labels as the cluster stage's rows, by uid range (`pcluster.write_ranges`)."""
        uids = np.asarray(self._uids(), object)
        return write_ranges(work, index, uids, self.shard.assign_N, self.shard.score_N, ups, bounds)

    def stats(self) -> ActorStats:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ctx = ray.get_runtime_context()
        memory = int(ctx.get_assigned_resources().get("memory", 0))
        return ActorStats(self.spec.n, int(peak_kib) * 1024, ctx.get_node_id(), memory)


def dkmeans(
    folder: str | Path,
    cfg: DKMeansConfig,
    *,
    store_rows: np.ndarray | None = None,
    init_KD: np.ndarray | None = None,
    out_dir: str | Path | None = None,
    candidates: CandidateRows | None = None,
    finish: Callable[[np.ndarray], tuple[str, list[np.ndarray], tuple[str, ...]]] | None = None,
) -> DKMeansResult:
    """Cluster the vectors of `folder` (all of them, the store rows `store_rows` in that order, or
    the `candidates`' rows) over Ray actors. `init_KD` overrides the seeded initial centroids.
    With `out_dir` the actors write their labels as `labels-NNNNNN.parquet` there and the result
    holds none; with `finish(centroids) -> (work, ups, bounds)` they write the cluster stage's
    rows by uid range (`pcluster.write_ranges`) and the result holds none."""
    npys, counts = folder_parts(folder)
    n = _pool_size(counts, store_rows, candidates)
    d = np.load(npys[0], mmap_mode="r").shape[1] if npys else 0
    if n < cfg.lloyd.k:
        raise ValueError(f"k={cfg.lloyd.k} clusters need at least {cfg.lloyd.k} vectors, got {n}: lower k")
    block_rows = cfg.lloyd.blocks(n, d)
    budget = cfg.budget or B.current()
    specs = plan_shards(npys, counts, n_actors_for(cfg, n, d, block_rows, budget), block_rows, store_rows, candidates)
    memory = [actor_memory(budget, s.n, d, cfg.lloyd.k, block_rows) for s in specs]
    opts = dict(
        num_cpus=B.resident_cpus(cfg.actor_cpus, memory),  # every actor resident at once
        scheduling_strategy="SPREAD",
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )
    cls = ray.remote(ShardActor)
    actors = [
        cls.options(**opts, **({"memory": m} if m else {})).remote(spec, block_rows) for spec, m in zip(specs, memory)
    ]
    try:
        init = init_KD if init_KD is not None else lloyd.init_centroids(_taker(actors, specs), n, cfg.lloyd)
        c32, total = lloyd.iterate(_partials(actors), _farthest(actors), init, cfg.lloyd.niter)
        if finish is not None:
            work, ups, bounds = finish(c32)
            ray.get([a.write_ranges.remote(work, i, ups, bounds) for i, a in enumerate(actors)])
            assign = score = None
        else:
            assign, score = _labels(actors, out_dir)
        stats = tuple(ray.get([a.stats.remote() for a in actors]))
    finally:
        for a in actors:
            ray.kill(a)
    return DKMeansResult(c32, total.counts_K, total.inertia, total.similarity, assign, score, stats)


def n_actors_for(cfg: DKMeansConfig, n: int, d: int, block_rows: int, budget: B.WorkerBudget | None = None) -> int:
    """Actors for n rows: `n_actors`, else n / `rows_per_actor`, else one per CPU; under a budget
    at least as many as keep each actor's whole blocks within `budget.kmeans_shard_rows`."""
    if cfg.n_actors is not None:
        wanted = cfg.n_actors
    elif cfg.rows_per_actor is not None:
        wanted = math.ceil(n / cfg.rows_per_actor)
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        wanted = max(1, int(cpus // cfg.actor_cpus) if cfg.actor_cpus else int(cpus))
    if budget is None:
        return wanted
    fits = B.kmeans_shard_rows(budget, d, cfg.lloyd.k, block_rows=block_rows)
    per = max(block_rows, fits // block_rows * block_rows)  # plan_shards gives whole blocks: at most `per` rows
    return max(wanted, math.ceil(n / per))


def actor_memory(budget: B.WorkerBudget | None, rows: int, d: int, k: int, block_rows: int) -> int | None:
    """Ray `memory=` of an actor holding `rows` (None without a budget)."""
    return None if budget is None else B.kmeans_actor_memory(budget, rows, d, k, block_rows=block_rows)


def _partials(actors):
    """partials(centroids) -> [their sum over the actors], folded in as each actor answers so
    the driver holds two k x D sums, not one per actor (int64 sums: the order changes nothing;
    the float totals are added in actor order)."""

    def run(c32_KD):
        ref = ray.put(c32_KD)  # one copy in the object store, read by every actor
        pending = {a.partials.remote(ref): i for i, a in enumerate(actors)}
        sums, counts, floats = None, None, np.zeros((len(actors), 2))
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            p = ray.get(done)
            floats[pending.pop(done)] = (p.inertia, p.similarity)
            sums = p.sums_KD.copy() if sums is None else np.add(sums, p.sums_KD, out=sums)
            counts = p.counts_K if counts is None else counts + p.counts_K
        return [lloyd.Partials(sums, counts, *(float(sum(col)) for col in floats.T))]

    return run


def _farthest(actors):
    return lambda m: ray.get([a.farthest.remote(m) for a in actors])


def _taker(actors, specs: list[ShardSpec]):
    """take(sorted pool rows) -> their float16 vectors, each asked of the actor holding it."""
    firsts = np.array([s.first for s in specs])

    def take(rows: np.ndarray) -> np.ndarray:
        owner = np.searchsorted(firsts, rows, side="right") - 1
        got = ray.get([actors[i].take.remote(rows[owner == i]) for i in np.unique(owner)])
        return np.concatenate(got)

    return take


def _labels(actors, out_dir) -> tuple[np.ndarray | None, np.ndarray | None]:
    if out_dir is None:
        got = ray.get([a.labels.remote() for a in actors])
        return np.concatenate([g[0] for g in got]).astype(np.int64), np.concatenate([g[1] for g in got])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ray.get([a.write_labels.remote(str(out / f"labels-{i:06d}.parquet")) for i, a in enumerate(actors)])
    return None, None


def cluster_vector_folder(
    folder: str | Path,
    k: int,
    *,
    n_actors: int | None = None,
    rows_per_actor: int | None = None,
    niter: int = 20,
    seed: int = 0,
    out_dir: str | Path | None = None,
    actor_cpus: float = 1.0,
) -> DKMeansResult:
    """Spherical k-means of every vector in a vector folder over Ray actors (the benchmark's
    entry point); with `out_dir` the labels go to Parquet parts and the driver holds none."""
    cfg = DKMeansConfig(
        lloyd=lloyd.LloydConfig(k=k, niter=niter, seed=seed),
        n_actors=n_actors,
        rows_per_actor=rows_per_actor,
        actor_cpus=actor_cpus,
    )
    return dkmeans(folder, cfg, out_dir=out_dir)
