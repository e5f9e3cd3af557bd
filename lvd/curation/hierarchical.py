"""Hierarchical k-means with resampling, and top-down balanced sampling (Vo et al. 2024).

Web pools are dominated by a few concepts; flat k-means spends most centroids on them, so
sampling evenly across its clusters still over-represents them. Vo et al. build a hierarchy:
level 1 clusters the points, level 2 clusters the level-1 centroids, and so on (k per level
from fine to coarse). At each level the k-means is refined by resampling steps: keep the
`sample_size` points closest to each centroid, re-run k-means on that sample only, re-assign
every point. Because every cluster contributes about the same number of points to the sample,
dense regions lose their pull on the centroids, which spread towards a uniform cover of the
support (their sec. 4). Level 1 skips resampling by default, as in their web-scale config.

Balanced sampling then walks the tree top-down: the budget is split evenly among the top-level
clusters; a cluster smaller than its share gives all it has and the rest is redistributed among
the others ("water filling", `water_fill`); each cluster's share is split the same way among its
children, down to level-1 clusters, which give random points (or those closest to their
centroid). Everything is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lvd.curation.kmeans import KMeansConfig, assign_to_centroids, kmeans
from lvd.curation.knn_index import as_unit_float32
from lvd.curation.uidbuckets import uid_hash

STRATEGIES = ("random", "closest")


@dataclass(frozen=True, kw_only=True)
class HierarchicalConfig:
    ks: tuple[int, ...]  # clusters per level, fine to coarse, e.g. (1000, 100, 10)
    resampling_steps: tuple[int, ...] | None = None  # per level; None: 0 at level 1, 10 above
    sample_sizes: tuple[int, ...] | None = (
        None  # points kept per cluster when resampling; None: half the mean cluster size
    )
    sample_strategy: str = "closest"  # resampled points: "closest" to their centroid, or "random"
    niter: int = 20  # Lloyd iterations of every k-means run
    nredo: int = 1
    seed: int = 0
    use_gpu: bool | None = None  # None: GPU when faiss.get_num_gpus() > 0

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks={self.ks}: give one positive k per level, fine to coarse, e.g. (1000, 100, 10)")
        if any(b >= a for a, b in zip(self.ks, self.ks[1:])):
            raise ValueError(
                f"ks={self.ks}: each level must have fewer clusters than the one below it (fine to coarse)"
            )
        for name in ("resampling_steps", "sample_sizes"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.ks):
                raise ValueError(f"{name}={value}: give one value per level ({len(self.ks)}), or None for the defaults")
        if self.resampling_steps is not None and min(self.resampling_steps) < 0:
            raise ValueError(f"resampling_steps={self.resampling_steps}: use 0 or more steps per level")
        if self.sample_sizes is not None and min(self.sample_sizes) < 1:
            raise ValueError(f"sample_sizes={self.sample_sizes}: keep at least 1 point per cluster")
        if self.sample_strategy not in STRATEGIES:
            raise ValueError(f"sample_strategy={self.sample_strategy!r}: use one of {STRATEGIES}")

    def steps_at(self, level: int) -> int:
        if self.resampling_steps is not None:
            return self.resampling_steps[level]
        return 0 if level == 0 else 10


@dataclass(frozen=True)
class Level:
    """One level of the tree: its centroids, and for every item of the level below (points at
    level 1, level-(l-1) clusters above) the cluster it belongs to."""

    centroids_KD: np.ndarray  # float32, unit rows
    assign: np.ndarray  # int64 [items below]
    resampling_steps_run: int  # fewer than asked when a sample got smaller than k


@dataclass(frozen=True)
class Hierarchy:
    levels: tuple[Level, ...]  # levels[0] clusters the points
    score_N: np.ndarray  # float32 cosine of each point to its level-1 centroid

    @property
    def n_points(self) -> int:
        return len(self.levels[0].assign)

    def labels(self, level: int) -> np.ndarray:
        """Cluster of every point at `level` (1 = finest, len(levels) = top), int64 [N]."""
        if not 1 <= level <= len(self.levels):
            raise ValueError(f"level={level}: use 1..{len(self.levels)}")
        lab = self.levels[0].assign
        for lvl in self.levels[1:level]:
            lab = lvl.assign[lab]
        return lab

    def sizes(self, level: int) -> np.ndarray:
        """Points per cluster at `level`, int64 [K_level]."""
        k = len(self.levels[level - 1].centroids_KD)
        return np.bincount(self.labels(level), minlength=k).astype(np.int64)


def hierarchical_kmeans(x_ND: np.ndarray, cfg: HierarchicalConfig) -> Hierarchy:
    """Build the tree over the rows of `x_ND` (L2-normalised). Needs at least ks[0] rows."""
    first, score_N = _fit_level(as_unit_float32(x_ND), cfg.ks[0], 0, cfg)
    return build_upper_levels(first, score_N, cfg)


def build_upper_levels(first: Level, score_N: np.ndarray, cfg: HierarchicalConfig) -> Hierarchy:
    """The tree above a level-1 clustering however it was made (in this process, or over Ray
    actors by `scale.dkmeans`): level l + 1 clusters level l's centroids, as Vo et al. do."""
    if len(first.centroids_KD) != cfg.ks[0]:
        raise ValueError(f"level 1 has {len(first.centroids_KD)} clusters, the config asks for ks[0]={cfg.ks[0]}")
    return Hierarchy(levels=(first, *upper_levels(first.centroids_KD, cfg)), score_N=score_N)


def upper_levels(centroids_KD: np.ndarray, cfg: HierarchicalConfig) -> tuple[Level, ...]:
    """Levels 2.. of the tree from level 1's centroids alone (what the partitioned cluster stage
    has in its driver): level l + 1 clusters level l's centroids."""
    levels: list[Level] = []
    items = centroids_KD
    for depth, k in enumerate(cfg.ks[1:], start=1):
        levels.append(_fit_level(items, k, depth, cfg)[0])
        items = levels[-1].centroids_KD
    return tuple(levels)


def _fit_level(items: np.ndarray, k: int, depth: int, cfg: HierarchicalConfig) -> tuple[Level, np.ndarray]:
    if len(items) < k:
        raise ValueError(f"level {depth + 1} asks for k={k} clusters of {len(items)} items: lower ks[{depth}]")
    seed = cfg.seed + 1000 * depth  # distinct, reproducible seeds per level and step
    res = kmeans(items, _kcfg(cfg, k, seed))
    centroids, assign, score = res.centroids_KD, res.assign_N, res.score_N
    size = cfg.sample_sizes[depth] if cfg.sample_sizes else max(1, len(items) // (2 * k))
    rng = np.random.default_rng(seed)
    steps_run = 0
    for step in range(cfg.steps_at(depth)):
        key = -score if cfg.sample_strategy == "closest" else rng.random(len(items))
        quota = np.full(k, size, dtype=np.int64)
        picked = take_per_group(assign, key, quota)
        if len(picked) < k:
            break  # too few points left to place k centroids; keep the last good ones
        centroids = kmeans(items[picked], _kcfg(cfg, k, seed + 1 + step)).centroids_KD
        assign, score = assign_to_centroids(items, centroids, use_gpu=cfg.use_gpu)
        steps_run += 1
    return Level(centroids_KD=centroids, assign=assign, resampling_steps_run=steps_run), score


def _kcfg(cfg: HierarchicalConfig, k: int, seed: int) -> KMeansConfig:
    return KMeansConfig(k=k, niter=cfg.niter, nredo=cfg.nredo, seed=seed, use_gpu=cfg.use_gpu)


def take_per_group(group_N: np.ndarray, key_N: np.ndarray, quota_G: np.ndarray) -> np.ndarray:
    """Row positions of the `quota_G[g]` rows with the smallest key in every group g (ties by
    row position), ascending. Groups with fewer rows than their quota give all of them."""
    order = np.lexsort((np.arange(len(group_N)), key_N, group_N))
    g_sorted = group_N[order]
    starts = np.searchsorted(g_sorted, np.arange(len(quota_G)))
    rank = np.arange(len(order)) - starts[g_sorted]
    return np.sort(order[rank < quota_G[g_sorted]])


def water_fill(sizes_G: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Split `budget` among groups as evenly as their sizes allow: int64 [G], each <= its size,
    summing to min(budget, sizes.sum()). Groups smaller than the even share give all they have;
    the leftover units (fewer than the groups still open) go to randomly chosen open groups."""
    sizes = np.asarray(sizes_G, dtype=np.int64)
    if budget < 0:
        raise ValueError(f"budget={budget}: use a non-negative number of items")
    if sizes.sum() <= budget:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # invariant: sum(min(lo, s)) <= budget < sum(min(hi, s))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(mid, sizes).sum() <= budget:
            lo = mid
        else:
            hi = mid
    alloc = np.minimum(lo, sizes)
    open_groups = np.flatnonzero(sizes > lo)
    extra = rng.choice(open_groups, size=int(budget - alloc.sum()), replace=False)
    alloc[extra] += 1
    return alloc


def balanced_sample(
    h: Hierarchy, target: int, *, seed: int = 0, strategy: str = "random", key_N: np.ndarray | None = None
) -> np.ndarray:
    """`min(target, N)` point indices (ascending) drawn top-down, evenly across the clusters of
    every level; within a level-1 cluster, random points or those closest to its centroid, or
    those with the smallest `key_N` when given (the stage gives `uid_keys`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use one of {STRATEGIES}")
    rng = np.random.default_rng(seed)
    quota = leaf_quotas(h.levels, h.sizes(1), target, rng)
    if key_N is None:
        key_N = -h.score_N if strategy == "closest" else rng.random(h.n_points)
    return take_per_group(h.levels[0].assign, key_N, quota)


def level_sizes(levels: tuple[Level, ...], leaf_sizes: np.ndarray) -> list[np.ndarray]:
    """Points per cluster at every level (finest first), from the level-1 sizes and the tree."""
    sizes = [np.asarray(leaf_sizes, np.int64)]
    for lvl in levels[1:]:
        below = np.bincount(lvl.assign, weights=sizes[-1], minlength=len(lvl.centroids_KD))
        sizes.append(np.rint(below).astype(np.int64))
    return sizes


def leaf_quotas(levels: tuple[Level, ...], leaf_sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Points to take from every level-1 cluster: `target` split evenly top-down (`water_fill`
    at the top, then among each cluster's children). It needs the tree and the level-1 sizes
    only, so a partitioned stage computes it in its driver (`scale.pretrieve`)."""
    sizes = level_sizes(levels, leaf_sizes)
    quota = water_fill(sizes[-1], target, rng)
    for level in range(len(levels), 1, -1):
        quota = _split_among_children(levels[level - 1].assign, sizes[level - 2], quota, rng)
    return quota


def uid_keys(uids, seed: int) -> np.ndarray:
    """uint64 [n]: a seeded hash of each uid (the first 8 bytes of sha256 of "seed:uid"), the
    random order of balanced sampling that does not depend on where a point is stored."""
    return np.array([uid_hash(u, seed) for u in uids], np.uint64)


def _split_among_children(parent_C: np.ndarray, sizes_C: np.ndarray, quota_P: np.ndarray, rng) -> np.ndarray:
    """Quota of every child cluster, given each parent's quota and which parent each child has."""
    child_quota = np.zeros(len(parent_C), dtype=np.int64)
    order = np.argsort(parent_C, kind="stable")
    bounds = np.searchsorted(parent_C[order], np.arange(len(quota_P) + 1))
    for p in np.flatnonzero(quota_P):
        children = order[bounds[p] : bounds[p + 1]]
        child_quota[children] = water_fill(sizes_C[children], int(quota_P[p]), rng)
    return child_quota
