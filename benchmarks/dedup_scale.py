"""Dedup scaling: time and memory of near_duplicate_edges + resolve at 1e4, 1e5, 1e6 hashes.

Synthetic pool: random uint64 pHash/dHash, 256-bit pHash and 16x16 thumbnails, plus planted
near-duplicates (1% of rows get a partner within the radii, thumbnail +-2 levels). Faiss runs single-threaded so the numbers do not depend on how busy
the machine's other cores are; CPU time (process_time) is reported beside wall time and the
growth exponent is fitted on CPU time (least squares of log t on log n). Peak memory is the
process's max RSS (monotone, so read after each size in increasing order).

Baseline, same process: the all-pairs `IndexBinaryFlat` range search (sizes <= --flat-max).

Run: .venv/bin/python benchmarks/dedup_scale.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss
import numpy as np

from lvd.curation.dedup import DedupConfig, near_duplicate_edges, resolve, thumb_residual

HASH64 = dict(verify_radius=None, max_thumb_residual=None)
CONFIGS = {
    "default": DedupConfig(),  # 8/8 + pHash-256 <= 16 + thumbnail residual <= 30
    "64bit 0/4": DedupConfig(phash_radius=0, dhash_radius=4, **HASH64),
    "64bit 8/8": DedupConfig(phash_radius=8, dhash_radius=8, **HASH64),
}


def synthetic(n: int, cfg: DedupConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    d = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    planted = rng.choice(n, size=n // 100, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), planted), size=len(planted), replace=False)
    p[planted] = p[src] ^ _masks(rng, len(planted), cfg.phash_radius)
    d[planted] = d[src] ^ _masks(rng, len(planted), cfg.dhash_radius or 0)
    v = rng.integers(0, 2**64 - 1, (n, 4), dtype=np.uint64)
    for w in range(4):  # up to 4 flipped bits per word: within 16 of 256 bits
        v[planted, w] = v[src, w] ^ _masks(rng, len(planted), (cfg.verify_radius or 0) // 4)
    t = rng.integers(0, 256, (n, 256), dtype=np.uint8)  # thumbnails; partners: +-2 levels of noise
    t[planted] = np.clip(t[src].astype(np.int16) + rng.integers(-2, 3, (len(planted), 256)), 0, 255).astype(np.uint8)
    return p, d, v.view(np.uint8), t


def _masks(rng, count: int, max_bits: int) -> np.ndarray:
    """One random mask of 0..max_bits set bits per row."""
    masks = np.zeros(count, np.uint64)
    nbits = rng.integers(0, max_bits + 1, count)
    for k in range(max_bits):
        bit = np.uint64(1) << rng.integers(0, 64, count).astype(np.uint64)
        masks |= np.where(nbits > k, bit, np.uint64(0))  # repeats only lower the count
    return masks


def run_once(p, d, v, t, cfg: DedupConfig) -> tuple[float, float, int]:
    n = len(p)
    uids = np.array([f"{i:016x}" for i in range(n)], dtype=object)
    wall, cpu = time.perf_counter(), time.process_time()
    edges = near_duplicate_edges(p, d, cfg, aspect=np.ones(n), verify=v, thumb=t)
    table = resolve(uids, np.full(n, 4096), [edges])
    return time.perf_counter() - wall, time.process_time() - cpu, table.num_rows


def flat_baseline(p, d, v, t, cfg: DedupConfig) -> tuple[float, int]:
    cpu = time.process_time()
    codes = p.view(np.uint8).reshape(len(p), 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, ids = index.range_search(codes, cfg.phash_radius + 1)
    q = np.repeat(np.arange(len(p)), np.diff(lims).astype(np.int64))
    keep = (q < ids) & (np.bitwise_count(d[q] ^ d[ids]) <= cfg.dhash_radius)
    if cfg.verify_radius is not None:
        words = v.view(np.uint64)
        keep &= np.bitwise_count(words[q] ^ words[ids]).sum(axis=1) <= cfg.verify_radius
    if cfg.max_thumb_residual is not None:
        keep[keep] = thumb_residual(t[q[keep]], t[ids[keep]]) <= cfg.max_thumb_residual
    return time.process_time() - cpu, int(keep.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="which settings to time (both 8/8 takes minutes at 1e6)")  # fmt: skip
    parser.add_argument("--flat-max", type=int, default=100_000, help="largest n for the all-pairs baseline")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    print(f"{'config':12s} {'n':>9s} {'wall s':>8s} {'cpu s':>8s} {'dups':>7s} {'maxrss MiB':>11s}")
    for name in args.configs:
        cfg, cpus = CONFIGS[name], []
        run_once(*synthetic(1000, cfg), cfg)  # warm-up: imports, Faiss/numpy first-call costs
        for n in args.sizes:
            wall, cpu, dups = run_once(*synthetic(n, cfg), cfg)
            cpus.append(cpu)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{name:12s} {n:9d} {wall:8.2f} {cpu:8.2f} {dups:7d} {rss:11.0f}", flush=True)
        if len(args.sizes) > 1:
            slope = np.polyfit(np.log(args.sizes), np.log(np.maximum(cpus, 1e-6)), 1)[0]
            print(f"{name:12s} growth exponent (cpu time vs n): {slope:.2f}")
        for n0 in [n for n in args.sizes if n <= args.flat_max]:
            pool = synthetic(n0, cfg)
            flat_cpu, flat_pairs = flat_baseline(*pool, cfg)
            _, ours_cpu, ours_pairs = run_once(*pool, cfg)
            assert ours_pairs == flat_pairs, (ours_pairs, flat_pairs)  # planted pairs are disjoint
            print(f"{name:12s} n={n0}: all-pairs IndexBinaryFlat {flat_cpu:.3f}s cpu / ours {ours_cpu:.3f}s"
                  f" = {flat_cpu / max(ours_cpu, 1e-9):.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
