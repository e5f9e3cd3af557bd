"""Faiss k-means (lvd.curation.kmeans) vs scikit-learn KMeans on the same L2-normalised data.

Data: N points around C random unit centres in D dims (noise, then projected back onto the
sphere), like image embeddings that cluster by concept. All runs use the same k, the same number
of Lloyd iterations and k-means++ seeding, one thread each (the machine is shared; set --threads
to compare multi-threaded). scikit-learn is Euclidean k-means, so the like-for-like comparison is
Faiss with spherical=False; spherical Faiss (unit centroids, cosine assignment: what curation
uses) is shown too. Inertia is the sum of squared Euclidean distances of every point to its
assigned centroid, computed the same way for all rows. Spherical centroids are unit vectors
while a cluster's mean m has |m| < 1, so a spherical cluster costs n(2 - 2|m|) against the
mean's n(1 - |m|^2): its inertia is higher by construction. `partition inertia` compares the
partitions themselves: the inertia to each cluster's mean, whatever centroid the method returned.

Faiss trains on at most 256*k sampled points by default; `faiss (all points)` sets the cap
above N so it sees exactly what scikit-learn sees.

Run: .venv/bin/python benchmarks/kmeans.py [--n 50000 --d 128 --k 100 --niter 20]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from lvd.curation.kmeans import KMeansConfig, kmeans


def sphere_mixture(n: int, d: int, concepts: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, concepts, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    diff = x.astype(np.float64) - centroids[labels]
    return float((diff**2).sum())


def partition_inertia(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    means = np.zeros((k, x.shape[1]))
    np.add.at(means, labels, x)
    means /= np.maximum(np.bincount(labels, minlength=k), 1)[:, None]
    return inertia(x, means, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="points")
    ap.add_argument("--d", type=int, default=128, help="dimension")
    ap.add_argument("--k", type=int, default=100, help="clusters")
    ap.add_argument("--concepts", type=int, default=300, help="true centres in the data")
    ap.add_argument("--noise", type=float, default=0.08, help="per-coordinate noise before projection")
    ap.add_argument("--niter", type=int, default=20, help="Lloyd iterations for every method")
    ap.add_argument("--threads", type=int, default=1, help="threads for Faiss and scikit-learn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x = sphere_mixture(args.n, args.d, args.concepts, args.noise, args.seed)
    faiss.omp_set_num_threads(args.threads)
    runs: dict[str, tuple[float, float, float, str]] = {}

    def faiss_run(name: str, **kw) -> None:
        t = time.perf_counter()
        res = kmeans(x, KMeansConfig(k=args.k, niter=args.niter, seed=args.seed, **kw))
        sec = time.perf_counter() - t
        runs[name] = (
            sec,
            inertia(x, res.centroids_KD, res.assign_N),
            partition_inertia(x, res.assign_N, args.k),
            f"{args.niter} iters",
        )

    faiss_run("faiss euclidean (all points)", spherical=False, max_points_per_centroid=args.n)
    faiss_run("faiss euclidean (256/centroid sample)", spherical=False)
    faiss_run("faiss spherical (all points)", spherical=True, max_points_per_centroid=args.n)
    faiss_run("faiss spherical (256/centroid sample)", spherical=True)
    with threadpool_limits(args.threads):
        t = time.perf_counter()
        # tol=0: run until labels stop changing or max_iter, like Faiss's fixed iteration count
        ref = KMeans(
            n_clusters=args.k, n_init=1, max_iter=args.niter, tol=0.0, algorithm="lloyd", random_state=args.seed
        ).fit(x)
        sec = time.perf_counter() - t
        runs["sklearn KMeans (lloyd)"] = (
            sec,
            inertia(x, ref.cluster_centers_, ref.labels_),
            partition_inertia(x, ref.labels_, args.k),
            f"{ref.n_iter_} iters",
        )

    base_t, base_i, base_p, _ = runs["sklearn KMeans (lloyd)"]
    print(
        f"k-means on {args.n}x{args.d} (unit rows, {args.concepts} concepts), k={args.k}, {args.threads} thread(s), faiss {faiss.__version__}"
    )
    print(
        f"{'method':40s} {'time s':>7s} {'t/sklearn':>9s} {'inertia':>9s} {'ratio':>7s} {'partition inertia':>18s} {'ratio':>7s}  iters"
    )
    for name, (sec, ine, part, iters) in runs.items():
        print(
            f"{name:40s} {sec:7.2f} {sec / base_t:9.3f} {ine:9.1f} {ine / base_i:7.4f} {part:18.1f} {part / base_p:7.4f}  {iters}"
        )


if __name__ == "__main__":
    main()
