"""k-NN search throughput, exact (IndexFlatIP) vs IVF (IndexIVFFlat), with IVF recall@k.

Pool and queries come from one mixture on the sphere (N points around C unit centres, noise,
re-normalised), like image embeddings; queries are held-out draws, not pool rows. recall@k is
|IVF top-k & exact top-k| / k averaged over queries, exact search being the reference computed
in the same process. Also a uniform-random pool (no structure: IVF's worst case) at one nprobe.
Threads: 1 by default (shared machine); --threads to change.

Run: .venv/bin/python benchmarks/knn_search.py [--n 200000 --d 128 --queries 2000 --k 10]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from lvd.curation.knn_index import IndexConfig, build_index, search


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n: int, d: int, concepts: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = unit(rng.standard_normal((concepts, d)))
    draw = lambda m: unit(centres[rng.integers(0, concepts, m)] + noise * rng.standard_normal((m, d)))  # noqa: E731
    return draw(n), draw


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(a, e)) / k for a, e in zip(approx, exact)]))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench(pool: np.ndarray, queries: np.ndarray, k: int, nprobes: list[int], nlist: int, label: str) -> None:
    exact_index, t_exact_build = timed(lambda: build_index(pool, IndexConfig(exact_below=len(pool) + 1)))
    exact, t_exact = timed(lambda: search(exact_index, queries, k))
    ivf_cfg = IndexConfig(exact_below=0, nlist=nlist, nprobe=nprobes[0])
    ivf, t_ivf_build = timed(lambda: build_index(pool, ivf_cfg))
    nlist = faiss.extract_index_ivf(ivf).nlist
    print(f"\n{label}: pool {pool.shape[0]}x{pool.shape[1]}, {len(queries)} queries, k={k}, IVF nlist={nlist}")
    print(
        f"build: exact {t_exact_build:.2f} s, IVF {t_ivf_build:.2f} s (train {nlist * ivf_cfg.train_points_per_list} points + add)"
    )
    print(f"{'index':18s} {'queries/s':>10s} {'speedup':>8s} {'recall@' + str(k):>10s}")
    qps_exact = len(queries) / t_exact
    print(f"{'exact FlatIP':18s} {qps_exact:10.0f} {1.0:8.2f} {1.0:10.4f}")
    for nprobe in nprobes:
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        got, sec = timed(lambda: search(ivf, queries, k))
        qps = len(queries) / sec
        print(
            f"{'IVF nprobe=' + str(nprobe):18s} {qps:10.0f} {qps / qps_exact:8.2f} {recall(got.ids_QK, exact.ids_QK):10.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="pool size")
    ap.add_argument("--d", type=int, default=128, help="dimension")
    ap.add_argument("--queries", type=int, default=2000, help="held-out queries")
    ap.add_argument("--k", type=int, default=10, help="neighbours")
    ap.add_argument("--concepts", type=int, default=2000, help="mixture centres")
    ap.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="per-coordinate noise before projection (0.1: a point's cosine to its centre ~0.6)",
    )
    ap.add_argument(
        "--nlist",
        type=int,
        default=1024,
        help="IVF lists (library default: 4*sqrt(n); 1789 at 200k trains ~10x longer on 1 core)",
    )
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64, 256], help="IVF lists probed")
    ap.add_argument("--threads", type=int, default=1, help="Faiss OpenMP threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    pool, draw = mixture(args.n, args.d, args.concepts, args.noise, rng)
    bench(pool, draw(args.queries), args.k, args.nprobe, args.nlist, f"mixture of {args.concepts} concepts")
    # A smaller uniform pool (no cluster structure, IVF's worst case) keeps the run short.
    uniform = unit(rng.standard_normal((args.n // 4, args.d)))
    queries = unit(rng.standard_normal((args.queries // 4, args.d)))
    bench(uniform, queries, args.k, [8, 32], args.nlist // 4, "uniform random (worst case)")


if __name__ == "__main__":
    main()
