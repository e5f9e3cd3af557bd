"""Retrieval of pool images near a seed set, and balanced sampling (Oquab et al. 2023, app. A).

Three ways to pick pool images, each returning a `Retrieval` with provenance per image:
- `sample_based`: the k nearest pool images of every seed image (paper: k=4, or 32 for small
  seed sets). An image found by several seeds is a collision: it is kept once, credited to its
  most similar seed, and counted.
- `cluster_based`: seeds are assigned to the pool's k-means clusters; every cluster holding more
  than 3 seed images (`min_seeds=4`) contributes up to M pool images (`per_cluster`), the seed
  set's total optionally capped (`max_images`, split evenly among the clusters).
- `balanced`: hierarchical balanced sampling of the pool to a target size (Vo et al. 2024),
  independent of any seeds.
Seeds may also be kept as-is (`include_seeds`): their rows are listed in `seeds_included`;
shipping them is the shard stage's job, since seeds are not pool images.
`union` merges the retrievals of several seed sets over one pool into a `Selection` with one
provenance row per image.
All inputs are L2-normalised embeddings; indices are row positions of the pool / seed matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from lvd.curation.hierarchical import STRATEGIES, Hierarchy, balanced_sample, take_per_group, water_fill
from lvd.curation.kmeans import KMeansResult, assign_to_centroids
from lvd.curation.knn_index import as_unit_float32, search

if TYPE_CHECKING:
    from lvd.curation.scale.shardindex import ShardedIndex

METHODS = ("sample", "cluster", "balanced")


@dataclass(frozen=True, kw_only=True)
class SampleRetrievalConfig:
    k: int = 4  # pool neighbours per seed image (paper: 4, or 32)
    min_similarity: float | None = None  # drop neighbours with a lower cosine; None keeps all k
    max_images: int | None = None  # cap for the seed set: the most similar images are kept
    include_seeds: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: retrieve at least one neighbour per seed (paper: 4 or 32)")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"max_images={self.max_images}: use a non-negative cap, or None")


@dataclass(frozen=True, kw_only=True)
class ClusterRetrievalConfig:
    min_seeds: int = 4  # a cluster qualifies when it holds at least this many seeds (paper: more than 3)
    per_cluster: int = 10_000  # M: pool images taken from each qualifying cluster
    max_images: int | None = None  # cap for the seed set, split evenly among qualifying clusters
    order: str = "random"  # which images of a cluster: "random", or "closest" to its centroid
    seed: int = 0
    include_seeds: bool = False

    def __post_init__(self):
        if self.min_seeds < 1:
            raise ValueError(f"min_seeds={self.min_seeds}: use 1 or more (paper: 4, i.e. more than 3)")
        if self.per_cluster < 1:
            raise ValueError(f"per_cluster={self.per_cluster}: take at least one image per cluster")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"max_images={self.max_images}: use a non-negative cap, or None")
        if self.order not in STRATEGIES:
            raise ValueError(f"order={self.order!r}: use one of {STRATEGIES}")


@dataclass(frozen=True, kw_only=True)
class BalancedConfig:
    target: int  # images to select (all of them when the pool is smaller)
    strategy: str = "random"  # within a leaf cluster: "random", or "closest" to its centroid
    seed: int = 0

    def __post_init__(self):
        if self.target < 0:
            raise ValueError(f"target={self.target}: use a non-negative number of images")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: use one of {STRATEGIES}")


@dataclass(frozen=True)
class RetrievalCounts:
    n_seeds: int  # seed images given (0 for balanced sampling)
    n_hits: int  # (seed or cluster, pool image) matches before merging and capping
    n_collisions: int  # pool images matched by more than one seed (sample-based)
    n_clusters: int  # clusters that contributed (cluster-based, balanced)
    n_capped: int  # images dropped by max_images
    n_selected: int  # pool images returned


@dataclass(frozen=True)
class Retrieval:
    """Selected pool rows (ascending, unique) with provenance per row.

    `seed_idx` is the retrieving seed (sample-based; -1 otherwise), `cluster_id` the pool
    cluster it came from (cluster-based: the k-means cluster; balanced: the level-1 cluster;
    -1 otherwise), `similarity` the cosine to that seed or to that cluster's centroid.
    """

    method: str
    pool_idx: np.ndarray  # int64 [M]
    seed_idx: np.ndarray  # int64 [M]
    cluster_id: np.ndarray  # int64 [M]
    similarity: np.ndarray  # float32 [M]
    seeds_included: np.ndarray  # int64 seed rows to ship as-is
    counts: RetrievalCounts

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {METHODS}")
        n = len(self.pool_idx)
        if not len(self.seed_idx) == len(self.cluster_id) == len(self.similarity) == n:
            raise ValueError("pool_idx, seed_idx, cluster_id and similarity must have one length")


def sample_based(index: faiss.Index | ShardedIndex, seeds_SD: np.ndarray, cfg: SampleRetrievalConfig) -> Retrieval:
    """The `cfg.k` nearest pool images of every seed; `index` is `knn_index.build_index(pool)`, or
    a pool sharded over Ray actors (`scale.shardindex.build`; the same neighbours in exact mode)."""
    seeds = as_unit_float32(seeds_SD, "seeds")
    nb = search(index, seeds, cfg.k) if isinstance(index, faiss.Index) else index.neighbours(seeds, cfg.k)
    seed_SK = np.broadcast_to(np.arange(len(seeds))[:, None], nb.ids_QK.shape)
    ok = nb.ids_QK >= 0
    if cfg.min_similarity is not None:
        ok &= nb.sims_QK >= cfg.min_similarity
    pool, seed, sim = nb.ids_QK[ok], seed_SK[ok], nb.sims_QK[ok]
    # Per pool image, the most similar seed first (ties: lower seed row), then keep the first.
    order = np.lexsort((seed, -sim, pool))
    pool, seed, sim = pool[order], seed[order], sim[order]
    first = np.r_[True, pool[1:] != pool[:-1]] if len(pool) else np.zeros(0, dtype=bool)
    multiplicity = np.diff(np.r_[np.flatnonzero(first), len(pool)])
    pool, seed, sim = pool[first], seed[first], sim[first]
    keep = _most_similar(sim, pool, cfg.max_images)
    counts = RetrievalCounts(
        n_seeds=len(seeds),
        n_hits=int(ok.sum()),
        n_collisions=int((multiplicity > 1).sum()),
        n_clusters=0,
        n_capped=len(pool) - len(keep),
        n_selected=len(keep),
    )
    return Retrieval(
        method="sample",
        pool_idx=pool[keep].astype(np.int64),
        seed_idx=seed[keep].astype(np.int64),
        cluster_id=np.full(len(keep), -1, dtype=np.int64),
        similarity=sim[keep].astype(np.float32),
        seeds_included=_seed_rows(len(seeds), cfg.include_seeds),
        counts=counts,
    )


def _most_similar(sim: np.ndarray, pool: np.ndarray, cap: int | None) -> np.ndarray:
    """Positions (into arrays sorted by pool row) of the `cap` most similar, by pool row."""
    if cap is None or cap >= len(sim):
        return np.arange(len(sim))
    return np.sort(np.lexsort((pool, -sim))[:cap])


def cluster_based(
    pool: KMeansResult, seeds_SD: np.ndarray, cfg: ClusterRetrievalConfig, key_N: np.ndarray | None = None
) -> Retrieval:
    """Up to `per_cluster` pool images from every pool cluster holding >= `min_seeds` seeds; with
    `order="random"`, within a cluster the smallest `key_N` when given (`hierarchical.uid_keys`:
    the partitioned stage's draw), else a seeded random draw in row order."""
    if not pool.spherical:
        raise ValueError("cluster_based needs spherical k-means of the pool (KMeansConfig(spherical=True))")
    seeds = as_unit_float32(seeds_SD, "seeds")
    seed_cluster, _ = assign_to_centroids(seeds, pool.centroids_KD)
    seeds_per_cluster = np.bincount(seed_cluster, minlength=pool.k)
    chosen = seeds_per_cluster >= cfg.min_seeds
    quota = np.where(chosen, np.minimum(cfg.per_cluster, pool.sizes()), 0)
    rng = np.random.default_rng(cfg.seed)
    wanted = int(quota.sum())
    if cfg.max_images is not None:
        quota = water_fill(quota, cfg.max_images, rng)
    if cfg.order == "closest":
        key = -pool.score_N
    else:
        key = rng.random(len(pool.assign_N)) if key_N is None else key_N
    rows = take_per_group(pool.assign_N, key, quota)
    counts = RetrievalCounts(
        n_seeds=len(seeds),
        n_hits=wanted,
        n_collisions=0,
        n_clusters=int(chosen.sum()),
        n_capped=wanted - len(rows),
        n_selected=len(rows),
    )
    return Retrieval(
        method="cluster",
        pool_idx=rows.astype(np.int64),
        seed_idx=np.full(len(rows), -1, dtype=np.int64),
        cluster_id=pool.assign_N[rows].astype(np.int64),
        similarity=pool.score_N[rows].astype(np.float32),
        seeds_included=_seed_rows(len(seeds), cfg.include_seeds),
        counts=counts,
    )


def balanced(h: Hierarchy, cfg: BalancedConfig, key_N: np.ndarray | None = None) -> Retrieval:
    """Hierarchical balanced sample of the pool to `cfg.target` images (Vo et al. 2024); within
    a level-1 cluster the smallest `key_N` when given (`hierarchical.uid_keys`)."""
    rows = balanced_sample(h, cfg.target, seed=cfg.seed, strategy=cfg.strategy, key_N=key_N)
    leaf = h.levels[0].assign[rows]
    counts = RetrievalCounts(
        n_seeds=0,
        n_hits=len(rows),
        n_collisions=0,
        n_clusters=len(np.unique(leaf)),
        n_capped=0,
        n_selected=len(rows),
    )
    return Retrieval(
        method="balanced",
        pool_idx=rows.astype(np.int64),
        seed_idx=np.full(len(rows), -1, dtype=np.int64),
        cluster_id=leaf.astype(np.int64),
        similarity=h.score_N[rows].astype(np.float32),
        seeds_included=np.zeros(0, dtype=np.int64),
        counts=counts,
    )


def _seed_rows(n_seeds: int, include: bool) -> np.ndarray:
    return np.arange(n_seeds if include else 0, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    """The union of several retrievals (e.g. one per seed set), one row per pool image.

    An image chosen by several retrievals is credited to the first in the given order:
    `source` is its position in that list, and `method` / `seed_idx` / `cluster_id` /
    `similarity` are copied from it (`seed_idx` indexes that retrieval's own seed set).
    """

    pool_idx: np.ndarray  # int64 [M] ascending, unique
    source: np.ndarray  # int64 [M]
    method: np.ndarray  # str [M]
    seed_idx: np.ndarray  # int64 [M]
    cluster_id: np.ndarray  # int64 [M]
    similarity: np.ndarray  # float32 [M]
    n_overlaps: int  # images chosen by more than one retrieval


def union(results: list[Retrieval]) -> Selection:
    """Merge retrievals over one pool into a `Selection` (first retrieval wins provenance)."""
    cat = lambda field: np.concatenate([getattr(r, field) for r in results]) if results else np.zeros(0)  # noqa: E731
    pool = cat("pool_idx").astype(np.int64)
    source = (
        np.concatenate([np.full(len(r.pool_idx), i, dtype=np.int64) for i, r in enumerate(results)])
        if results
        else pool
    )
    order = np.lexsort((source, pool))  # per image, the earliest retrieval first
    pool, source = pool[order], source[order]
    first = np.r_[True, pool[1:] != pool[:-1]] if len(pool) else np.zeros(0, dtype=bool)
    repeats = np.diff(np.r_[np.flatnonzero(first), len(pool)])
    pick = order[first]
    methods = (
        np.concatenate([np.full(len(r.pool_idx), r.method) for r in results]) if results else np.zeros(0, dtype=str)
    )
    return Selection(
        pool_idx=pool[first],
        source=source[first],
        method=methods[pick],
        seed_idx=cat("seed_idx").astype(np.int64)[pick],
        cluster_id=cat("cluster_id").astype(np.int64)[pick],
        similarity=cat("similarity").astype(np.float32)[pick],
        n_overlaps=int((repeats > 1).sum()),
    )
