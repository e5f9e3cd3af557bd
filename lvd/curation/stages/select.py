"""The stages that choose what ships: cluster, retrieve, shard.

- `RUN/cluster/clusters.parquet`: one row per candidate (`rundir.candidates`, sorted by
  uid): `uid`, `leaf` (level-1 cluster), `score` (cosine to its centroid), `cluster_ids` (one
  id per level, coarsest first, as the shard JSON wants); `clusters.tree.parquet`: `level`
  (0 = finest), `cluster`, `parent` (cluster one level up, -1 at the top), `centroid`. Flat
  spherical k-means is a one-level tree; `hierarchical=True` builds Vo et al.'s tree. The
  level-1 k-means runs in this task with Faiss for pools below `distributed_above` candidates,
  and from there over Ray actors holding shards of the vector parts (`scale.dkmeans`; the
  levels above cluster its centroids here); `engine="lloyd"` is that Lloyd in this task, equal
  to the distributed result bit for bit.
- `RUN/retrieve/selection.parquet`: the selected uids with provenance (`method`, `seed_set`,
  `seed_uid`, `cluster_id`, `similarity`); `selection.counts.parquet`: one row per seed set
  (or `*` for balanced sampling) with `retrieve.RetrievalCounts`, collisions included.
- `RUN/shards/shard-NNNNNN.tar` + `manifest.parquet` (`lvd.curation.shards`), one Ray task per
  shard (markers in `RUN/shard_parts/`, so the shards folder holds only the contract files);
  the manifest is written last, from the per-shard markers' rows. What ships is planned by
  Ray tasks into uid-sorted Parquet files (`shardplan`); a shard task reads its slice of them.
What is sharded: the retrieval's selection when the retrieve stage ran (seeds, or a target
size), plus included seed images; otherwise every candidate (all images that are neither rejected, duplicate nor
decontaminated) — so a run without an embedder still ships everything dedup kept.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lvd.curation import rundir, runner
from lvd.curation.hierarchical import (
    HierarchicalConfig,
    Hierarchy,
    Level,
    build_upper_levels,
    hierarchical_kmeans,
    upper_levels,
)  # fmt: skip
from lvd.curation.kmeans import KMeansConfig, KMeansResult, kmeans
from lvd.curation.lloyd import LloydConfig, lloyd
from lvd.curation.scale import budget as B
from lvd.curation.scale import pcluster
from lvd.curation.scale.dkmeans import DKMeansConfig, dkmeans
from lvd.curation.shards import (
    MANIFEST_SCHEMA,
    ShardConfig,
    ShardInfo,
    ShardSample,
    plan_shards,
    shard_name,
    write_manifest,
    write_shard,
)  # fmt: skip
from lvd.curation.stages import shardplan
from lvd.curation.vectors import open_vectors

ENGINES = ("auto", "faiss", "lloyd", "ray")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    k: int | None = None  # level-1 clusters; None: round(sqrt(candidates))
    hierarchical: bool = False  # Vo et al. tree (each level ~sqrt of the one below) instead of flat k-means
    levels: int = 3  # most levels of the tree
    niter: int = 20
    seed: int = 0
    # level-1 k-means: "faiss" (in this task), "lloyd" (lvd.curation.lloyd in this task), "ray" (the
    # same Lloyd over Ray actors holding vector shards), "auto" (faiss below distributed_above, else ray)
    engine: str = "auto"
    distributed_above: int = 1_000_000  # candidates from which "auto" distributes
    actors: int | None = None  # "ray": actors; None: rows_per_actor, else one per CPU of the cluster
    rows_per_actor: int | None = None  # "ray": most rows one actor holds
    block_rows: int | None = None  # "lloyd"/"ray": rows scored at once (shards are whole blocks); None: ~32 MiB
    # no task holds the pool (`scale.pcluster`): True / False force it, None takes it from
    # `distributed_above` ingest records on (engine "auto" or "ray")
    partitioned: bool | None = None

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k={self.k}: use at least one cluster, or None for sqrt(#images)")
        if self.levels < 1:
            raise ValueError(f"levels={self.levels}: use at least one level")
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: use one of {ENGINES}")
        DKMeansConfig(lloyd=self.lloyd(1), n_actors=self.actors, rows_per_actor=self.rows_per_actor)
        if self.partitioned and self.engine not in ("auto", "ray"):
            raise ValueError(
                f"partitioned=True runs the Lloyd over Ray actors: use engine 'auto' or 'ray', not {self.engine!r}"
            )

    def partitions(self, records: int) -> bool:
        """Whether the stage takes the partitioned path for a run of `records` ingest records."""
        if self.partitioned is not None:
            return self.partitioned
        return self.engine in ("auto", "ray") and records >= self.distributed_above

    def lloyd(self, k: int) -> LloydConfig:
        return LloydConfig(k=k, niter=self.niter, seed=self.seed, block_rows=self.block_rows)

    def engine_for(self, n: int) -> str:
        if self.engine != "auto":
            return self.engine
        return "ray" if n >= self.distributed_above else "faiss"

    def ks(self, n: int) -> tuple[int, ...]:
        ks = [max(1, min(n, self.k or round(math.sqrt(n))))]
        # each level ~sqrt of the one below; a one-cluster top level would say nothing
        while self.hierarchical and len(ks) < self.levels and (nxt := round(math.sqrt(ks[-1]))) >= 2 and nxt < ks[-1]:
            ks.append(nxt)
        return tuple(ks)


@dataclass(frozen=True)
class ClusterFn:
    run_dir: str
    cfg: ClusterConfig

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run = Path(self.run_dir)
        uids = rundir.candidates(run)
        _check_task_budget(len(uids))
        if not uids:
            return {"": _clusters_table([], np.zeros(0, np.int64), np.zeros(0), []), "tree": _tree_table(())}
        h = self.tree(rundir.vectors_dir(run), uids)
        ids = [h.labels(lvl).tolist() for lvl in range(len(h.levels), 0, -1)]
        return {
            "": _clusters_table(uids, h.levels[0].assign, h.score_N, [list(c) for c in zip(*ids)]),
            "tree": _tree_table(h.levels),
        }

    def tree(self, vectors: Path, uids: list[str]) -> Hierarchy:
        ks, cfg = self.cfg.ks(len(uids)), self.cfg
        hcfg = HierarchicalConfig(ks=ks, niter=cfg.niter, seed=cfg.seed)
        engine = cfg.engine_for(len(uids))
        if engine == "faiss" and cfg.hierarchical and len(ks) > 1:
            return hierarchical_kmeans(open_vectors(vectors).get(uids), hcfg)
        if engine == "faiss":
            km = kmeans(open_vectors(vectors).get(uids), KMeansConfig(k=ks[0], niter=cfg.niter, seed=cfg.seed))
            return Hierarchy(levels=(Level(km.centroids_KD, km.assign_N, 0),), score_N=km.score_N)
        first, score = _lloyd_level1(vectors, uids, ks[0], cfg, engine)
        return build_upper_levels(first, score, hcfg) if cfg.hierarchical else Hierarchy((first,), score)


def _check_task_budget(n: int) -> None:
    """Refuse, before the work, a pool this stage's one task cannot hold under `--worker-memory`:
    the task holds ~460 B a candidate (`budget.CLUSTER_TASK_IMAGE_BYTES`, measured). The flow
    takes the partitioned path past it (`curate_tasks.cluster_sizes`) unless the config forces one task."""
    B.check_one_task(
        "cluster",
        n,
        B.CLUSTER_TASK_IMAGE_BYTES,
        "or drop engine 'faiss'/'lloyd' and partitioned=False: the partitioned stage holds no pool",
    )


def _lloyd_level1(vectors: Path, uids: list[str], k: int, cfg: ClusterConfig, engine: str) -> tuple[Level, np.ndarray]:
    """Level 1 by the exact Lloyd, in this task or over Ray actors (the same result bit for bit).
    The Lloyd sees the candidates in store-row order, as the partitioned stage does (`scale.pcluster`);
    the labels come back in `uids`' order."""
    store, lcfg = open_vectors(vectors), cfg.lloyd(k)
    rows = store.rows(uids)
    order = np.argsort(rows, kind="stable")
    if engine == "lloyd":
        res = lloyd(store.take(rows[order]), lcfg)
    else:
        dcfg = DKMeansConfig(lloyd=lcfg, n_actors=cfg.actors, rows_per_actor=cfg.rows_per_actor)
        res = dkmeans(vectors, dcfg, store_rows=rows[order])
    assign, score = np.empty_like(res.assign_N), np.empty_like(res.score_N)
    assign[order], score[order] = res.assign_N, res.score_N
    return Level(res.centroids_KD, assign, 0), score


def _clusters_table(uids, leaf, score, cluster_ids) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "leaf": pa.array(np.asarray(leaf, np.int64)),
            "score": pa.array(np.asarray(score, np.float32)),
            "cluster_ids": pa.array(cluster_ids, pa.list_(pa.int64())),
        }
    )


def _tree_table(levels) -> pa.Table:
    rows = {"level": [], "cluster": [], "parent": [], "centroid": []}
    for depth, lvl in enumerate(levels):
        parents = levels[depth + 1].assign if depth + 1 < len(levels) else np.full(len(lvl.centroids_KD), -1)
        for c, (vec, parent) in enumerate(zip(lvl.centroids_KD, parents)):
            rows["level"].append(depth), rows["cluster"].append(c)
            rows["parent"].append(int(parent)), rows["centroid"].append(vec.tolist())
    return pa.table(
        {
            "level": pa.array(rows["level"], pa.int32()),
            "cluster": pa.array(rows["cluster"], pa.int64()),
            "parent": pa.array(rows["parent"], pa.int64()),
            "centroid": pa.array(rows["centroid"], pa.list_(pa.float32())),
        }
    )


def run_cluster(
    run_dir: Path, cfg: ClusterConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig()
) -> runner.StageReport:
    unit = runner.WholeStage(fingerprint=rundir.input_digest(run_dir, "cluster"), stem="clusters")
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values())
    if cfg.partitions(records):
        return _run_partitioned(Path(run_dir), cfg, rcfg, unit)
    return runner.map_partitions(
        ClusterFn(str(run_dir), cfg),
        [unit],
        rundir.stage_dir(run_dir, "cluster"),
        cfg_hash=runner.config_hash(cfg),
        runner=rcfg,
    )


def _run_partitioned(run_dir: Path, cfg: ClusterConfig, rcfg: runner.RunnerConfig, unit) -> runner.StageReport:
    """The stage with no task holding the pool (`scale.pcluster`): the same outputs and marker
    as the one-task stage with engine "lloyd" / "ray"."""
    stage, cfg_hash = rundir.stage_dir(run_dir, "cluster"), runner.config_hash(cfg)
    report, todo = runner.plan_stage(stage, [unit], cfg_hash, checksums=rcfg.verify_checksums)
    if not todo:
        return report
    runner.init_ray()
    work = stage / pcluster.WORK
    shutil.rmtree(work, ignore_errors=True)
    opts = {"num_cpus": rcfg.num_cpus, "max_retries": rcfg.max_retries, **budget_options()}
    vectors = rundir.vectors_dir(run_dir)
    found = pcluster.find_candidates(run_dir, vectors, work, opts)
    n = found.rows.n
    if n == 0:
        empty = {"": _clusters_table([], np.zeros(0, np.int64), np.zeros(0), []), "tree": _tree_table(())}
        marker = runner.write_outputs(empty, unit, stage, cfg_hash, partitioned=True)
    else:
        ks = cfg.ks(n)
        hcfg = HierarchicalConfig(ks=ks, niter=cfg.niter, seed=cfg.seed)
        tree: list[pa.Table] = []

        def finish(c32_KD: np.ndarray):
            ups = upper_levels(c32_KD, hcfg) if cfg.hierarchical else ()
            tree.append(_tree_table((Level(c32_KD, np.zeros(0, np.int64), 0), *ups)))
            return str(work), [u.assign for u in ups], found.bounds

        dcfg = DKMeansConfig(lloyd=cfg.lloyd(ks[0]), n_actors=cfg.actors, rows_per_actor=cfg.rows_per_actor)
        dkmeans(vectors, dcfg, candidates=found.rows, finish=finish)
        merge = ray.remote(pcluster.merge).options(**opts)
        marker = ray.get(merge.remote(str(work), len(found.bounds) + 1, unit, str(stage), cfg_hash, tree[0]))
    shutil.rmtree(work, ignore_errors=True)
    return runner.collect(report, [marker], 1)


def budget_options() -> dict:
    """Ray `memory=` for a partitioned stage's tasks under the job's `--worker-memory` (none without)."""
    budget = B.current()
    return B.ray_options(budget) if budget is not None else {}


def read_clusters(run_dir: Path) -> tuple[pa.Table, Hierarchy] | None:
    """The cluster stage's table and its tree rebuilt (None when it did not run)."""
    if (found := rundir.clusters(run_dir)) is None:
        return None
    t, levels = found[0], tree_levels(found[1])
    if levels:  # level 1 assigns the points
        levels = (Level(levels[0].centroids_KD, np.asarray(t["leaf"].to_numpy(), np.int64), 0), *levels[1:])
    return t, Hierarchy(levels=levels, score_N=t["score"].to_numpy())


def tree_levels(tree: pa.Table) -> tuple[Level, ...]:
    """The cluster tree's levels from `clusters.tree.parquet` alone: centroids, and each level's
    assignment of the clusters below (level 1's assignment of points is left empty)."""
    d = tree.to_pydict()
    levels = []
    for depth in sorted(set(d["level"])):
        cents = np.array([c for c, lv in zip(d["centroid"], d["level"]) if lv == depth], np.float32)
        below = [p for p, lv in zip(d["parent"], d["level"]) if lv == depth - 1]
        levels.append(Level(cents, np.asarray(below, np.int64), 0))
    return tuple(levels)


def flat_kmeans(h: Hierarchy) -> KMeansResult:
    """The tree's finest level as the flat k-means result cluster-based retrieval reads."""
    lvl = h.levels[0]
    return KMeansResult(lvl.centroids_KD, lvl.assign, h.score_N, math.nan, math.nan, True)


@dataclass(frozen=True, kw_only=True)
class ShardUnit:
    index: int
    fingerprint: str
    slices: tuple[tuple[str, int, int], ...]  # (plan file, first row, end row): `shardplan.Plan.slices`


@dataclass(frozen=True)
class ShardFn:
    run_dir: str
    cfg: ShardConfig

    def __call__(self, unit: ShardUnit) -> dict[str, pa.Table]:
        run = Path(self.run_dir)
        rows = shardplan.read_rows(unit.slices)
        blobs = shardplan.read_blobs(rows)
        samples = [
            ShardSample(
                uid=r["uid"],
                source=r["source"],
                width=r["width"],
                height=r["height"],
                data=blobs[r["uid"]],
                cluster_ids=tuple(r["cluster_ids"] or ()),
                retrieval=json.loads(r["retrieval"]),
                faces=face_boxes(r["detail"]),
            )
            for r in rows
        ]
        info = write_shard(unit.index, samples, rundir.shards_dir(run), self.cfg)
        n = info.n_samples
        return {
            "": pa.table(
                {
                    "key": info.keys,
                    "uid": info.uids,
                    "source": info.sources,
                    "shard": [info.name] * n,
                    "shard_sha256": [info.sha256] * n,
                    "shard_samples": [n] * n,
                    "shard_bytes": [info.bytes] * n,
                },
                schema=MANIFEST_SCHEMA,
            )
        }


def face_boxes(detail: str | None) -> tuple[tuple[int, int, int, int], ...]:
    """The face boxes ingest's face detection recorded in a record's detail (none: ())."""
    return tuple(tuple(b) for b in json.loads(detail).get("faces", ())) if detail else ()


def run_shards(
    run_dir: Path,
    cfg: ShardConfig,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    progress: runner.ProgressFn | None = None,
    *,
    range_rows: int = shardplan.RANGE_ROWS,
) -> runner.StageReport:
    """Plan what ships with Ray tasks (`shardplan`), write one tar per Ray task (resumable per
    shard), then the manifest."""
    plan = shardplan.plan(run_dir, range_rows=range_rows)
    cfg_hash = runner.config_hash(cfg)
    units = []
    for i, r in enumerate(plan_shards(plan.total, cfg.shard_size)):
        slices = plan.slices(r.start, r.stop)
        units.append(ShardUnit(index=i, fingerprint=plan.fingerprint(slices), slices=slices))
    shards_dir, parts_dir = rundir.shards_dir(run_dir), rundir.stage_dir(run_dir, "shard_parts")
    shards_dir.mkdir(parents=True, exist_ok=True)
    for old in shards_dir.glob("shard-*.tar"):  # the selection shrank: these are no longer planned
        if old.name not in {shard_name(u.index) for u in units}:
            old.unlink()
    (shards_dir / rundir.MANIFEST).unlink(missing_ok=True)  # written last, only when all shards are
    for u in units:  # a marker vouches for its tar only while the tar is there
        if not (shards_dir / shard_name(u.index)).exists():
            runner.marker_path(parts_dir, runner.stem_of(u)).unlink(missing_ok=True)
    rep = runner.map_partitions(
        ShardFn(str(run_dir), cfg), units, parts_dir, cfg_hash=cfg_hash, runner=rcfg, progress=progress
    )
    infos = [_info(pq.read_table(parts_dir / rep.markers[u.index]["outputs"]["main"])) for u in units]
    write_manifest(infos, shards_dir, cfg)
    shutil.rmtree(shardplan.work_dir(run_dir), ignore_errors=True)
    return rep


def _info(t: pa.Table) -> ShardInfo:
    d = t.to_pydict()
    return ShardInfo(
        name=d["shard"][0],
        n_samples=len(d["key"]),
        sha256=d["shard_sha256"][0],
        bytes=d["shard_bytes"][0],
        keys=tuple(d["key"]),
        uids=tuple(d["uid"]),
        sources=tuple(d["source"]),
    )
