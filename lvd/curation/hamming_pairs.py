"""All pairs of binary codes within a Hamming radius, without comparing all pairs.

Pigeonhole over disjoint chunks: a pair within `radius` bits agrees, up to `nflip` bits, on at
least one of `nhash` chunks when nhash * (nflip + 1) > radius. Wide chunks (the 256-bit pHash
at radius 16: 9 chunks of 28 bits, nflip 1) are joined by sorting (`_sorted_chunk_pairs`);
narrow ones (64-bit codes) by Faiss's `IndexBinaryMultiHash`, whose parameters trade probes
against bucket occupancy (`_multihash_params`). Both return exactly the pairs within radius.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

_QUERY_BATCH = 1 << 16  # bounds the size of one RangeSearchResult
_SORT_CHUNK_BITS = 24  # chunks at least this wide: sort-based candidates (equal runs are rare)


def candidate_pairs(words: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of codes (uint64 [n, w]) within `radius` bits, via IndexBinaryMultiHash."""
    n, nbits = len(words), 64 * words.shape[1]
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nhash = (radius + 2) // 2
    if nbits // nhash >= _SORT_CHUNK_BITS:
        return _sorted_chunk_pairs(words, radius, nhash)
    nhash, b, nflip = _multihash_params(radius, n, nbits)
    index = faiss.IndexBinaryMultiHash(nbits, nhash, b)
    index.nflip = nflip
    codes = np.ascontiguousarray(words).view(np.uint8).reshape(n, nbits // 8)  # byte order only permutes bits
    index.add(codes)
    parts_a, parts_b = [], []
    for start in range(0, n, _QUERY_BATCH):
        lims, _, ids = index.range_search(codes[start : start + _QUERY_BATCH], radius + 1)  # strict <
        q = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = q < ids
        parts_a.append(q[keep])
        parts_b.append(ids[keep].astype(np.int64))
    return np.concatenate(parts_a), np.concatenate(parts_b)


def _sorted_chunk_pairs(words: np.ndarray, radius: int, nhash: int) -> tuple[np.ndarray, np.ndarray]:
    """Superset of the pairs within `radius` bits (i < j, unique), by sorting instead of hashing.

    Pigeonhole over `nhash` = ceil((radius+1)/2) disjoint chunks: a pair within radius differs
    in <= 1 bit of some chunk, i.e. agrees on that chunk with one bit position (any, for equal
    chunks) forced to 1. Each (chunk, bit) is one sort of n keys and a scan for equal runs:
    sequential memory, n log n, where Faiss's hash probes (29 per chunk) miss the cache once
    tables outgrow it. Needs wide chunks (rare equal runs); callers check the radius after.
    """
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [n, nbits], any fixed order
    width = min(bits.shape[1] // nhash, 32)
    parts_a, parts_b = [], []
    for c in range(nhash):
        packed = np.zeros((len(words), 8), np.uint8)
        packed[:, : (width + 7) // 8] = np.packbits(bits[:, c * width : (c + 1) * width], axis=1, bitorder="little")
        key = packed.view(np.uint64).ravel()
        for k in range(width):
            a, b = _equal_runs(key | np.uint64(1 << k))
            parts_a.append(a)
            parts_b.append(b)
    a, b = np.concatenate(parts_a), np.concatenate(parts_b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pair = np.unique(lo * len(words) + hi)
    return pair // len(words), pair % len(words)


def _equal_runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of row indices with equal keys (each pair once, unordered)."""
    order = np.argsort(key)
    k = key[order]
    parts_a, parts_b = [], []
    pos = np.flatnonzero(k[1:] == k[:-1])  # positions whose next element is equal
    step = 1
    while len(pos):
        parts_a.append(order[pos])
        parts_b.append(order[pos + step])
        step += 1
        pos = pos[pos + step < len(k)]
        pos = pos[k[pos + step] == k[pos]]
    if not parts_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(parts_a).astype(np.int64), np.concatenate(parts_b).astype(np.int64)


def _multihash_params(radius: int, n: int, nbits: int) -> tuple[int, int, int]:
    """(nhash, bits per hash, nflip) covering `radius` exactly, at least estimated cost.

    Exact when nhash * (nflip + 1) > radius (pigeonhole over disjoint chunks). Cost per query
    ~ probes * (1 + expected bucket occupancy n / 2**b): few long chunks probe many buckets,
    many short chunks return crowded buckets. b <= 32 keeps faiss's bucket keys in range.
    """
    best = None
    for nhash in range(1, min(radius + 1, nbits) + 1):
        nflip = math.ceil((radius + 1) / nhash) - 1
        b = min(nbits // nhash, 32)
        probes = nhash * sum(math.comb(b, k) for k in range(nflip + 1))
        cost = probes * (1.0 + n / 2.0**b)
        if best is None or cost < best[0]:
            best = (cost, nhash, b, nflip)
    return best[1:]
