"""Spherical k-means over L2-normalised embeddings with Faiss (GPU when Faiss sees one).

Spherical k-means (unit centroids, points assigned by cosine similarity) is what LVD-142M
clusters its embeddings with (Oquab et al. 2023, app. A). Faiss runs Lloyd iterations with an
exact inner-product index; `spherical=False` gives plain Euclidean k-means (the baseline that
benchmarks/kmeans.py compares against scikit-learn).

Deterministic for a seed on one machine: Faiss draws its initial centroids and its training
subsample (at most `max_points_per_centroid * k` points) from `seed`. After training every
point is assigned once more to the final centroids, so `assign_N` and `inertia` always describe
the returned centroids and the whole input, not Faiss's subsample.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from lvd.curation.knn_index import as_unit_float32, gpu_wanted

_ASSIGN_BATCH = 65_536  # rows per Faiss search when assigning; bounds the [B, 1] buffers
# Seeding methods by name; k-means++ (Faiss >= 1.12) avoids the merged-blob local optima that
# uniform random seeding falls into on well-separated data.
_INIT_METHODS = {"random": "ClusteringInitMethod_RANDOM", "kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS"}


@dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    k: int  # number of clusters
    niter: int = 20  # Lloyd iterations
    seed: int = 0
    nredo: int = 1  # restarts; the best objective wins
    init: str = "kmeans++"  # initial centroids: "kmeans++" or "random" (Faiss's classic sampling)
    spherical: bool = True  # unit centroids and cosine assignment; False: Euclidean k-means
    max_points_per_centroid: int = 256  # Faiss trains on at most k * this many sampled points
    use_gpu: bool | None = None  # None: GPU when faiss.get_num_gpus() > 0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: use at least one cluster")
        if self.niter < 1:
            raise ValueError(f"niter={self.niter}: use at least one iteration (Faiss default 25)")
        if self.nredo < 1:
            raise ValueError(f"nredo={self.nredo}: use at least one run")
        if self.init not in _INIT_METHODS:
            raise ValueError(f"init={self.init!r}: use one of {sorted(_INIT_METHODS)}")
        if self.init != "random" and not hasattr(faiss, _INIT_METHODS[self.init]):
            raise ValueError(
                f"init={self.init!r} needs faiss >= 1.12 (found {faiss.__version__}): upgrade, or use init='random'"
            )
        if self.max_points_per_centroid < 1:
            raise ValueError(
                f"max_points_per_centroid={self.max_points_per_centroid}: use a positive cap (Faiss default 256)"
            )


@dataclass(frozen=True)
class KMeansResult:
    """Centroids and the assignment of every input row to its nearest centroid.

    `score_N` is the cosine similarity to the assigned centroid (spherical) or the squared
    Euclidean distance to it (Euclidean). `inertia` is the sum of squared Euclidean distances
    to the assigned centroids, comparable across both modes and with scikit-learn's `inertia_`
    (on unit vectors and unit centroids it equals sum(2 - 2 cos)). `objective` is Faiss's final
    training objective on its subsample (sum of similarities, or of squared distances).
    """

    centroids_KD: np.ndarray  # float32
    assign_N: np.ndarray  # int64 cluster per row
    score_N: np.ndarray  # float32
    inertia: float
    objective: float
    spherical: bool

    @property
    def k(self) -> int:
        return len(self.centroids_KD)

    def sizes(self) -> np.ndarray:
        """Rows per cluster, int64 [K] (zeros for empty clusters)."""
        return np.bincount(self.assign_N, minlength=self.k).astype(np.int64)

    def members(self, cluster: int) -> np.ndarray:
        """Row positions of one cluster, ascending."""
        return np.flatnonzero(self.assign_N == cluster)


def kmeans(x_ND: np.ndarray, cfg: KMeansConfig) -> KMeansResult:
    """Cluster the rows of `x_ND` into `cfg.k` clusters (rows must be L2-normalised when
    `cfg.spherical`). Needs at least `k` rows."""
    x = as_unit_float32(x_ND) if cfg.spherical else np.ascontiguousarray(x_ND, dtype=np.float32)
    if len(x) < cfg.k:
        raise ValueError(f"k={cfg.k} clusters need at least {cfg.k} rows, got {len(x)}: lower k")
    km = faiss.Kmeans(
        x.shape[1],
        cfg.k,
        niter=cfg.niter,
        nredo=cfg.nredo,
        seed=cfg.seed,
        spherical=cfg.spherical,
        max_points_per_centroid=cfg.max_points_per_centroid,
        gpu=gpu_wanted(cfg.use_gpu),
        # Hierarchical k-means clusters centroids (about 10 per cluster) and small resamples on
        # purpose; Faiss's "please provide at least 39*k points" warning would fire every time.
        min_points_per_centroid=1,
        verbose=False,
        **_init_kwargs(cfg.init),
    )
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    assign, score = assign_to_centroids(x, centroids, spherical=cfg.spherical, use_gpu=cfg.use_gpu)
    return KMeansResult(
        centroids_KD=centroids,
        assign_N=assign,
        score_N=score,
        inertia=_inertia(x, centroids, assign),
        objective=float(km.obj[-1]) if len(km.obj) else float("nan"),
        spherical=cfg.spherical,
    )


def _init_kwargs(init: str) -> dict:
    if not hasattr(faiss, _INIT_METHODS[init]):
        return {}  # old Faiss: random seeding is its only method (validated in the config)
    return {"init_method": getattr(faiss, _INIT_METHODS[init])}


def assign_to_centroids(
    x_ND: np.ndarray, centroids_KD: np.ndarray, *, spherical: bool = True, use_gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per row: (cluster int64 [N], score float32 [N]); the score is cosine
    similarity when `spherical`, squared Euclidean distance otherwise. Ties go to the lower id."""
    x = np.ascontiguousarray(x_ND, dtype=np.float32)
    c = np.ascontiguousarray(centroids_KD, dtype=np.float32)
    index = faiss.IndexFlatIP(c.shape[1]) if spherical else faiss.IndexFlatL2(c.shape[1])
    if gpu_wanted(use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    assign = np.empty(len(x), dtype=np.int64)
    score = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _ASSIGN_BATCH):
        s, i = index.search(x[start : start + _ASSIGN_BATCH], 1)
        assign[start : start + len(i)] = i[:, 0]
        score[start : start + len(s)] = s[:, 0]
    return assign, score


def _inertia(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> float:
    total = 0.0
    for start in range(0, len(x), _ASSIGN_BATCH):
        diff = x[start : start + _ASSIGN_BATCH] - centroids[assign[start : start + _ASSIGN_BATCH]]
        total += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
    return total
