"""Cluster-size spread before and after hierarchical balanced sampling, vs random sampling.

Pool: N points from C concepts on the sphere with Zipf-like frequencies (weight 1/rank^a), the
long tail web dumps have. Every selection of `target` points is scored on its histogram over the
true concepts: normalised entropy (1 = uniform), Gini coefficient (0 = uniform), the largest
concept's share, and how many concepts it covers. Rows:
- full pool, and a uniform random sample of the target size (the baseline);
- flat k-means + balanced sampling (one level), hierarchical without resampling, and
  hierarchical with resampling (Vo et al. 2024's recipe), all with random leaf sampling.
All runs share one process, one seed and one thread.

Run: .venv/bin/python benchmarks/balanced_sampling.py [--n 50000 --concepts 200 --target 5000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from lvd.curation.hierarchical import HierarchicalConfig, balanced_sample, hierarchical_kmeans


def skewed_mixture(n: int, d: int, concepts: int, alpha: float, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, concepts + 1) ** alpha
    labels = rng.choice(concepts, size=n, p=weights / weights.sum())
    x = centres[labels] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def spread(labels: np.ndarray, concepts: int) -> tuple[float, float, float, int]:
    counts = np.bincount(labels, minlength=concepts).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(concepts))
    c = np.sort(counts)
    ranks = np.arange(1, concepts + 1)
    gini = float((2 * (ranks * c).sum()) / (concepts * c.sum()) - (concepts + 1) / concepts)
    return entropy, gini, float(p.max()), int((counts > 0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="pool size")
    ap.add_argument("--d", type=int, default=64, help="dimension")
    ap.add_argument("--concepts", type=int, default=200, help="true concepts")
    ap.add_argument("--alpha", type=float, default=1.2, help="Zipf exponent of concept frequencies")
    ap.add_argument("--noise", type=float, default=0.08, help="per-coordinate noise before projection")
    ap.add_argument("--target", type=int, default=5000, help="sample size")
    ap.add_argument("--ks", type=int, nargs="+", default=[1000, 200, 50], help="clusters per level, fine to coarse")
    ap.add_argument("--threads", type=int, default=1, help="Faiss OpenMP threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    x, labels = skewed_mixture(args.n, args.d, args.concepts, args.alpha, args.noise, args.seed)
    rng = np.random.default_rng(args.seed)

    rows: dict[str, tuple[np.ndarray, float]] = {"full pool": (np.arange(args.n), 0.0)}
    rows["random sample"] = (rng.choice(args.n, size=args.target, replace=False), 0.0)
    ks = tuple(args.ks)
    variants = {
        f"flat k-means k={ks[0]}": HierarchicalConfig(ks=ks[:1], seed=args.seed),
        f"hierarchical {ks}, no resampling": HierarchicalConfig(ks=ks, resampling_steps=(0,) * len(ks), seed=args.seed),
        f"hierarchical {ks}, resampling": HierarchicalConfig(ks=ks, seed=args.seed),
    }
    for name, cfg in variants.items():
        t = time.perf_counter()
        tree = hierarchical_kmeans(x, cfg)
        picked = balanced_sample(tree, args.target, seed=args.seed)
        rows[name] = (picked, time.perf_counter() - t)

    print(
        f"pool {args.n}x{args.d}, {args.concepts} concepts, Zipf alpha={args.alpha}, target {args.target}, {args.threads} thread(s)"
    )
    base = spread(labels[rows["random sample"][0]], args.concepts)
    print(
        f"{'selection':44s} {'n':>6s} {'entropy':>8s} {'/random':>8s} {'gini':>6s} {'/random':>8s} {'max share':>9s} {'concepts':>8s} {'fit s':>6s}"
    )
    for name, (picked, sec) in rows.items():
        ent, gini, top, covered = spread(labels[picked], args.concepts)
        print(
            f"{name:44s} {len(picked):6d} {ent:8.3f} {ent / base[0]:8.3f} {gini:6.3f} {gini / base[1]:8.3f} {top:9.3f} {covered:8d} {sec:6.1f}"
        )


if __name__ == "__main__":
    main()
