"""The retrieve stage: pick pool candidates near seed sets, or a balanced sample of the pool.

Methods (`RetrieveConfig.method`):
- `sample`: the k nearest candidates of every seed image of every seed set (paper: k=4);
- `cluster`: candidates of the pool's k-means clusters holding >= `min_seeds` seeds of a set;
- `hierarchical`: balanced sampling of the cluster tree to `target` images (seeds unused).
With seeds, `target` (when given) caps each seed set's retrieval (`max_images`); with no seeds
and a target, balanced sampling is used whatever the method. Seed sets are unioned in name
order (first set wins an image's provenance); collisions (images found by several seeds of a
set) and overlaps (found by several sets) are counted.
Seeds are ingested, deduped and embedded as their own runs (RUN/seeds/<name>); their unique,
non-duplicate accepted images are the queries. With `include_seeds` (sample / cluster) those
queries ship too (`selection.seeds.parquet`: `uid`, `seed_set`, `run`), except a seed whose
bytes are also in the pool: the pool's own decision (duplicate, decontaminated, selected or
not) stands for it. The seed runs' ledgers then mark shipped seeds `sharded`.
From PARTITIONED_MIN candidates on (or past what one task holds under --worker-memory) no
process holds the pool: `scale.pretrieve` (balanced sampling) and `scale.pseeds` (with seeds)
give the one task's tables row for row (with an exact k-NN index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvd.curation import rundir, runner
from lvd.curation.hierarchical import uid_keys
from lvd.curation.knn_index import build_index
from lvd.curation.retrieve import (
    BalancedConfig,
    ClusterRetrievalConfig,
    Retrieval,
    SampleRetrievalConfig,
    balanced,
    cluster_based,
    sample_based,
    union,
)  # fmt: skip
from lvd.curation.scale import budget as B
from lvd.curation.scale import pretrieve, pseeds, shardindex
from lvd.curation.scale.pseeds import shipped_seeds
from lvd.curation.stages.select import budget_options, flat_kmeans, read_clusters
from lvd.curation.vectors import open_vectors

METHODS = ("sample", "cluster", "hierarchical")


@dataclass(frozen=True, kw_only=True)
class RetrieveConfig:
    method: str = "sample"
    target: int | None = None  # images to select (balanced) or cap per seed set (seeds)
    k: int = 4  # neighbours per seed (sample)
    min_seeds: int = 4  # seeds a cluster needs (cluster; paper: more than 3)
    per_cluster: int = 10_000  # images per qualifying cluster (cluster)
    include_seeds: bool = False  # ship the seed images themselves too
    seed: int = 0
    # the pool's k-NN index (sample): one in-process index below knn.sharded_above candidates, else
    # sharded over Ray actors (exact below knn.index.exact_below rows, IVF above)
    knn: shardindex.ShardConfig = field(default_factory=shardindex.ShardConfig)
    # no task holding the pool (balanced sampling: `scale.pretrieve`; with seeds: `scale.pseeds`):
    # True / False force it, None takes it from PARTITIONED_MIN candidates on, or when the one
    # task could not hold them under the job's --worker-memory (`budget.retrieve_task_images`)
    partitioned: bool | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {METHODS}")
        if self.target is not None and self.target < 0:
            raise ValueError(f"target={self.target}: use a non-negative number of images, or None")
        if isinstance(self.knn, dict):  # from flow parameters (JSON)
            object.__setattr__(self, "knn", shardindex.ShardConfig(**self.knn))


@dataclass(frozen=True)
class RetrieveFn:
    run_dir: str
    seed_dirs: dict[str, str]
    cfg: RetrieveConfig

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run = Path(self.run_dir)
        uids = np.asarray(rundir.candidates(run), dtype=object)
        # refused before the work when its one task (partitioned=False) cannot hold the pool
        note = "or leave partitioned unset: the partitioned stage holds no pool in one process"
        B.check_one_task("retrieve", len(uids), B.RETRIEVE_TASK_IMAGE_BYTES, note)
        clusters = read_clusters(run)
        if not self.seed_dirs or self.cfg.method == "hierarchical":
            names, seed_uids = ["*"], [[]]
            keys = uid_keys(uids.tolist(), self.cfg.seed)  # the partitioned stage's draw (`scale.pretrieve`)
            results = [balanced(clusters[1], BalancedConfig(target=self._target(), seed=self.cfg.seed), keys)]
        else:
            names = sorted(self.seed_dirs)
            index = self._pool_index(run, uids) if self.cfg.method == "sample" else None
            # cluster based: the partitioned stage's draw (`scale.pseeds`), hashed once for every set
            keys = uid_keys(uids.tolist(), self.cfg.seed) if self.cfg.method == "cluster" else None
            results, seed_uids = [], []
            try:
                for name in names:
                    s_uids, s_vecs = seed_vectors(Path(self.seed_dirs[name]))
                    seed_uids.append(s_uids)
                    results.append(self._retrieve(index, clusters, s_vecs, keys))
            finally:
                if isinstance(index, shardindex.ShardedIndex):
                    index.close()
        sel = union(results)
        table = pa.table(
            {
                "uid": pa.array(uids[sel.pool_idx].tolist(), pa.string()),
                "method": pa.array(sel.method.tolist(), pa.string()),
                "seed_set": pa.array([names[s] for s in sel.source.tolist()], pa.string()),
                "seed_uid": pa.array(
                    [seed_uids[s][i] if i >= 0 else None for s, i in zip(sel.source.tolist(), sel.seed_idx.tolist())],
                    pa.string(),
                ),
                "cluster_id": pa.array(sel.cluster_id, pa.int64()),
                "similarity": pa.array(np.round(sel.similarity.astype(np.float64), 6), pa.float64()),
            }
        ).sort_by([("uid", "ascending")])
        counts = [dict(seed_set=n, overlaps=sel.n_overlaps, **asdict(r.counts)) for n, r in zip(names, results)]
        return {"": table, "counts": pa.Table.from_pylist(counts), "seeds": self._seeds(run, names)}

    def _seeds(self, run: Path, names: list[str]) -> pa.Table:
        """Seed images to ship (`include_seeds`): as the partitioned stage ships them."""
        with_seeds = bool(self.seed_dirs) and self.cfg.method != "hierarchical"
        return shipped_seeds(run, names, self.seed_dirs, self.cfg.include_seeds and with_seeds)

    def _pool_index(self, run: Path, uids: np.ndarray):
        """The candidates' vectors indexed: in this process when few, else sharded over Ray actors."""
        folder = rundir.vectors_dir(run)
        if len(uids) < self.cfg.knn.sharded_above:
            return build_index(open_vectors(folder).get(uids), self.cfg.knn.index)
        return shardindex.build(folder, uids, self.cfg.knn)

    def _target(self) -> int:
        if self.cfg.target is None:
            raise ValueError("hierarchical retrieval needs a target size (--target-size N)")
        return self.cfg.target

    def _retrieve(self, index, clusters, seeds_SD: np.ndarray, keys: np.ndarray | None) -> Retrieval:
        if self.cfg.method == "sample":
            return sample_based(
                index,
                seeds_SD,
                SampleRetrievalConfig(k=self.cfg.k, max_images=self.cfg.target, include_seeds=self.cfg.include_seeds),
            )
        cfg = ClusterRetrievalConfig(
            min_seeds=self.cfg.min_seeds,
            per_cluster=self.cfg.per_cluster,
            max_images=self.cfg.target,
            seed=self.cfg.seed,
            include_seeds=self.cfg.include_seeds,
        )
        return cluster_based(flat_kmeans(clusters[1]), seeds_SD, cfg, keys)


def seed_vectors(seed_dir: Path) -> tuple[list[str], np.ndarray]:
    """A seed set's queries: its accepted images that are not duplicates, sorted by uid."""
    uids = rundir.candidates(seed_dir)
    return uids, open_vectors(rundir.vectors_dir(seed_dir)).get(uids)


PARTITIONED_MIN = 1_000_000  # candidates from which balanced sampling is partitioned by default


def partitions(run_dir: Path, cfg: RetrieveConfig) -> bool:
    """Whether the stage runs partitioned (`scale.pretrieve`, `scale.pseeds`): `cfg.partitioned`,
    else from the candidates the cluster stage wrote."""
    if cfg.partitioned is not None:
        return cfg.partitioned
    marker = runner.read_marker(rundir.stage_dir(run_dir, "cluster"), "clusters")
    n = marker["rows"]["main"] if marker else 0
    budget = B.current()
    return n >= PARTITIONED_MIN or (budget is not None and n > B.retrieve_task_images(budget))


def run_retrieve(
    run_dir: Path, seed_dirs: dict[str, Path], cfg: RetrieveConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig()
) -> runner.StageReport:
    seeds = [rundir.stage_dir(seed_dirs[n], s) for n in sorted(seed_dirs) for s in ("dedup", "embed")]
    unit = runner.WholeStage(fingerprint=rundir.input_digest(run_dir, "retrieve", *seeds), stem="selection")
    fn = RetrieveFn(str(run_dir), {k: str(v) for k, v in seed_dirs.items()}, cfg)
    if partitions(Path(run_dir), cfg):
        stage, cfg_hash = rundir.stage_dir(run_dir, "retrieve"), runner.config_hash(cfg, sorted(seed_dirs))
        report, todo = runner.plan_stage(stage, [unit], cfg_hash, checksums=rcfg.verify_checksums)
        if todo:
            runner.init_ray()
            opts = {"num_cpus": rcfg.num_cpus, "max_retries": rcfg.max_retries, **budget_options()}
            if not seed_dirs or cfg.method == "hierarchical":
                marker = pretrieve.balanced_partitioned(
                    Path(run_dir), fn._target(), cfg.seed, unit, stage, cfg_hash, opts
                )  # fmt: skip
            else:
                p = dict(k=cfg.k, cap=cfg.target, min_seeds=cfg.min_seeds, per_cluster=cfg.per_cluster,
                         include_seeds=cfg.include_seeds, seed=cfg.seed, knn=cfg.knn)  # fmt: skip
                dirs = {n: str(d) for n, d in seed_dirs.items()}
                marker = pseeds.seeds_partitioned(Path(run_dir), dirs, cfg.method, p, unit, stage, cfg_hash, opts)
            report = runner.collect(report, [marker], 1)
        return report
    return runner.map_partitions(
        fn,
        [unit],
        rundir.stage_dir(run_dir, "retrieve"),
        cfg_hash=runner.config_hash(cfg, sorted(seed_dirs)),
        runner=rcfg,
    )
