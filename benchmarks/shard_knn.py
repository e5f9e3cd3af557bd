"""Sharded k-NN (lvd.curation.scale.shardindex): IVF recall@k against exact search by nprobe, and
query time, on a vector folder of synthetic d=128 embeddings.

The pool is a mixture on the sphere (N points around C unit centres plus noise, re-normalised,
float16 as the embed stage stores it), written as `--parts` vector parts; queries are held-out
draws. The baseline is one in-process exact `knn_index` search over the same rows, in this
process: it gives the reference neighbours (recall = |top-k & exact top-k| / k, averaged) and
the time every other row is a ratio of. Sharded exact must equal it (checked, printed).
Shards run as Ray actors on a local Ray of `--cpus` CPUs (the driver is this process).

Run: .venv/bin/python benchmarks/shard_knn.py [--n 100000 --shards 2 --queries 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lvd.curation import knn_index, vectors
from lvd.curation.knn_index import IndexConfig
from lvd.curation.runner import init_ray
from lvd.curation.scale import shardindex as si


def mixture(n: int, d: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / exact.shape[1] for a, e in zip(approx, exact)]))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="pool size")
    ap.add_argument("--d", type=int, default=128, help="dimension")
    ap.add_argument("--concepts", type=int, default=1000, help="mixture centres")
    ap.add_argument("--noise", type=float, default=0.08, help="per-coordinate noise around a centre")
    ap.add_argument("--parts", type=int, default=8, help="vector parts the pool is written as")
    ap.add_argument("--shards", type=int, default=2, help="shard actors")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--nprobe", default="1,4,8,16,32,64", help="comma-separated nprobe values for IVF")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.concepts, args.d))
    x = mixture(args.n, args.d, centres, args.noise, rng)
    q = mixture(args.queries, args.d, centres, args.noise, rng).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="shard-knn-"))
    for j, rows in enumerate(np.array_split(np.arange(args.n), args.parts)):
        vectors.write_vectors(folder, j, [f"u{r}" for r in rows], x[rows])
    init_ray(num_cpus=args.cpus)
    print(f"pool {args.n} x {args.d} in {args.parts} parts, {args.queries} queries, {args.shards} shard actors")

    one = knn_index.build_index(x, IndexConfig(exact_below=args.n + 1))
    (ref10, ref64), t_base = timed(lambda: (knn_index.search(one, q, 10), knn_index.search(one, q, 64)))
    print(f"baseline: one in-process exact index, k=10 and k=64: {t_base:.2f} s")

    cfg = si.ShardConfig(mode="exact", n_shards=args.shards)
    with si.build(folder, cfg=cfg) as index:
        (s10, s64), t = timed(lambda: (index.neighbours(q, 10), index.neighbours(q, 64)))
    same = np.array_equal(s10.ids_QK, ref10.ids_QK) and np.array_equal(s64.sims_QK, ref64.sims_QK)
    print(f"sharded exact: identical={same}  time {t / t_base:.2f}x baseline")

    nlist = IndexConfig().lists_for(args.n)
    print(f"sharded IVF-Flat, nlist={nlist} (4*sqrt(N)), trained on {nlist * 64} sampled rows")
    print(f"{'nprobe':>6} {'recall@10':>10} {'recall@64':>10} {'time vs baseline':>17}")
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        cfg = si.ShardConfig(index=IndexConfig(nprobe=nprobe), mode="ivf", n_shards=args.shards)
        with si.build(folder, cfg=cfg) as index:
            (a10, a64), t = timed(lambda index=index: (index.neighbours(q, 10), index.neighbours(q, 64)))
        r10, r64 = recall(a10.ids_QK, ref10.ids_QK), recall(a64.ids_QK, ref64.ids_QK)
        print(f"{nprobe:>6} {r10:>10.4f} {r64:>10.4f} {t / t_base:>16.2f}x")


if __name__ == "__main__":
    main()
