"""Spherical Lloyd k-means whose result does not depend on how the rows are split over workers.

`scale.dkmeans` runs these iterations over Ray actors that each hold a shard of the pool; run
in one process (`lloyd`) the same code is its reference. Faiss's k-means (`kmeans.kmeans`) keeps
its seeding and empty-cluster splitting inside C++ and sums in float32, so a distributed run
could not reproduce it; this one is written so that the split changes nothing, bit for bit:
- Rows are float16, as the vector store keeps them. Every float16 is a multiple of 2**-24, so
  cluster sums are kept as int64 counts of 2**-24 (`Partials.sums_KD`): exact whatever the
  order of the additions, hence the same from one shard or from many.
- Scores (cosines) are computed in blocks of `block_rows` rows at block-aligned row positions,
  and shards start at multiples of `block_rows` (only the pool's last block is short): every
  row goes through the same BLAS call in the same place whichever worker holds it (a row's
  float32 dot products otherwise depend on the shape of the matrix around it).
Update: a centroid is the sum of its rows divided by its norm (spherical k-means, Faiss's
`spherical=True` rule). An empty cluster takes, in cluster order, one of the rows farthest from
their centroid (lowest cosine, ties by row): scikit-learn's rule, made deterministic. Assignment
ties go to the lower cluster id. Initial centroids come from a seeded sample of rows that a
`take(rows)` callback fetches, so no caller needs the pool in RAM to seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lvd.curation.kmeans import KMeansResult

SCALE = float(2**24)  # float16 values are integer multiples of 2**-24 (subnormals included)
INITS = ("kmeans++", "random")


@dataclass(frozen=True, kw_only=True)
class LloydConfig:
    k: int  # clusters
    niter: int = 20  # Lloyd iterations (fixed: no early stop, so every run does the same work)
    seed: int = 0  # which rows seed the centroids
    init: str = "kmeans++"  # k-means++ on a seeded sample of rows, or k "random" rows
    init_sample: int | None = None  # rows sampled for k-means++; None: max(64 * k, 8192), at most N
    block_rows: int | None = None  # rows per scoring block; None: default_block_rows(N, k, D)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: use at least one cluster")
        if self.niter < 0:
            raise ValueError(f"niter={self.niter}: use 0 or more iterations")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: use one of {INITS}")
        if self.init_sample is not None and self.init_sample < self.k:
            raise ValueError(f"init_sample={self.init_sample}: sample at least k={self.k} rows, or None")
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError(f"block_rows={self.block_rows}: use a positive number of rows, or None")

    def blocks(self, n: int, d: int) -> int:
        return self.block_rows or default_block_rows(n, self.k, d)

    def sample_size(self, n: int) -> int:
        return min(n, self.init_sample or max(64 * self.k, 8192))


def default_block_rows(n: int, k: int, d: int) -> int:
    """Rows per block: a power of two keeping a block's float32 scores [B, k] and float64 rows
    [B, D] within 32 MiB, and small enough that a pool has 64 blocks or more (shards are whole
    blocks: smaller blocks spread a small pool over more actors); 256 to 65,536."""
    by_memory = 2 ** math.floor(math.log2(max(1, (32 << 20) // (8 * max(k, d)))))
    by_pool = 2 ** math.ceil(math.log2(max(1, math.ceil(n / 64))))
    return int(min(65_536, max(256, min(by_memory, by_pool))))


class Partials(NamedTuple):
    """What one shard contributes to an iteration; `reduce` adds them up exactly."""

    sums_KD: np.ndarray  # int64, per-cluster sum of its rows in units of 2**-24
    counts_K: np.ndarray  # int64, rows per cluster
    inertia: float  # sum of squared distances to the assigned centroids
    similarity: float  # sum of cosines to the assigned centroids (Faiss's spherical objective)


class Farthest(NamedTuple):
    """A shard's rows farthest from their centroids, by (score, row) ascending."""

    score_M: np.ndarray  # float32 cosine to the assigned centroid
    row_M: np.ndarray  # int64 row in the whole pool
    vecs_MD: np.ndarray  # float16


class Shard:
    """Contiguous rows `first .. first + len(x16_ND)` of the pool, held as float16; remembers the
    assignment of the last pass (for `farthest` and the final labels)."""

    def __init__(self, x16_ND: np.ndarray, first: int, block_rows: int):
        if x16_ND.dtype != np.float16 or x16_ND.ndim != 2:
            raise ValueError(f"a shard holds float16 [n, D] rows, got {x16_ND.dtype} {x16_ND.shape}")
        if first % block_rows:
            raise ValueError(f"a shard starts at a multiple of block_rows={block_rows}, not at row {first}")
        self.x16_ND, self.first, self.block_rows = x16_ND, first, block_rows
        self.assign_N = np.zeros(len(x16_ND), np.int32)  # 8 bytes a row with the score (k < 2**31)
        self.score_N = np.zeros(len(x16_ND), np.float32)
        self.x_sq = float(sum(np.einsum("nd,nd->", b, b, dtype=np.float64) for b in self._blocks()))

    def _blocks(self):
        for s in range(0, len(self.x16_ND), self.block_rows):
            yield self.x16_ND[s : s + self.block_rows]

    def partials(self, c32_KD: np.ndarray) -> Partials:
        """Assign every row to its nearest centroid and sum the rows per cluster."""
        k, d = c32_KD.shape
        sums, similarity = np.zeros((k, d), np.int64), 0.0
        for s, x in zip(range(0, len(self.x16_ND), self.block_rows), self._blocks()):
            assign, score = _nearest(x, c32_KD)
            self.assign_N[s : s + len(x)], self.score_N[s : s + len(x)] = assign, score
            _add_group_sums(sums, x, assign)
            similarity += float(score.sum(dtype=np.float64))
        counts = np.bincount(self.assign_N, minlength=k).astype(np.int64)
        # sum of |x - c|^2 = sum |x|^2 - 2 sum x.c + sum_k count_k |c_k|^2
        c_sq = np.einsum("kd,kd->k", c32_KD, c32_KD, dtype=np.float64)
        inertia = self.x_sq - 2 * similarity + float(counts @ c_sq)
        return Partials(sums, counts, inertia, similarity)

    def farthest(self, m: int) -> Farthest:
        """The `m` rows with the lowest score of the last pass (ties: lower row first)."""
        rows = np.arange(self.first, self.first + len(self.score_N))
        pick = np.lexsort((rows, self.score_N))[:m]
        return Farthest(self.score_N[pick], rows[pick], self.x16_ND[pick])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float16 vectors of pool rows `rows` (all inside this shard)."""
        return self.x16_ND[np.asarray(rows, np.int64) - self.first]


def _nearest(x16_BD: np.ndarray, c32_KD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine) of each row of one block."""
    sims = x16_BD.astype(np.float32) @ c32_KD.T
    assign = sims.argmax(axis=1)  # first maximum: ties go to the lower id
    return assign.astype(np.int64), sims[np.arange(len(sims)), assign]


def _add_group_sums(sums_KD: np.ndarray, x16_BD: np.ndarray, assign_B: np.ndarray) -> None:
    """Add the block's rows to their clusters' int64 sums, in units of 2**-24 (exact: float64
    holds a block's partial sums of float16 values without rounding)."""
    order = np.argsort(assign_B, kind="stable")
    groups, starts = np.unique(assign_B[order], return_index=True)
    block = np.add.reduceat(x16_BD[order].astype(np.float64), starts, axis=0)
    sums_KD[groups] += (block * SCALE).astype(np.int64)


def reduce(parts: Sequence[Partials]) -> Partials:
    """The sum of the shards' partials (exact for sums and counts; float64 for the rest)."""
    return Partials(
        sums_KD=np.sum([p.sums_KD for p in parts], axis=0, dtype=np.int64),
        counts_K=np.sum([p.counts_K for p in parts], axis=0, dtype=np.int64),
        inertia=float(sum(p.inertia for p in parts)),
        similarity=float(sum(p.similarity for p in parts)),
    )


def merge_farthest(found: Sequence[Farthest], m: int) -> Farthest:
    """The `m` farthest rows over all shards, by (score, row)."""
    score = np.concatenate([f.score_M for f in found])
    row = np.concatenate([f.row_M for f in found])
    vecs = np.concatenate([f.vecs_MD for f in found])
    pick = np.lexsort((row, score))[:m]
    return Farthest(score[pick], row[pick], vecs[pick])


def update(prev_KD: np.ndarray, total: Partials, farthest: Callable[[int], Farthest]) -> np.ndarray:
    """Next float64 unit centroids: normalised sums; an empty cluster (or a zero sum) takes one
    of the farthest rows, in cluster order; with too few rows it keeps its previous centroid."""
    sums = total.sums_KD.astype(np.float64) / SCALE
    norms = np.linalg.norm(sums, axis=1)
    out = prev_KD.copy()
    ok = norms > 0
    out[ok] = sums[ok] / norms[ok, None]
    if (empty := np.flatnonzero(~ok)).size:
        far = farthest(len(empty))
        out[empty[: len(far.row_M)]] = unit64(far.vecs_MD)
    return out


def unit64(x_ND: np.ndarray) -> np.ndarray:
    x = np.asarray(x_ND, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def iterate(
    partials: Callable[[np.ndarray], Sequence[Partials]],
    farthest: Callable[[int], Sequence[Farthest]],
    init_KD: np.ndarray,
    niter: int,
) -> tuple[np.ndarray, Partials]:
    """`niter` Lloyd steps from `init_KD`, then one more pass so the returned partials (sizes,
    inertia) and the shards' remembered assignment describe the returned float32 centroids."""
    c = unit64(init_KD)
    for _ in range(niter):
        total = reduce(partials(c.astype(np.float32)))
        c = update(c, total, lambda m: merge_farthest(farthest(m), m))
    c32 = c.astype(np.float32)
    return c32, reduce(partials(c32))


def init_centroids(take: Callable[[np.ndarray], np.ndarray], n: int, cfg: LloydConfig) -> np.ndarray:
    """float64 [k, D] unit initial centroids from rows fetched by `take(rows)` (sorted pool rows ->
    their vectors): k seeded random rows, or k-means++ on a seeded sample of `cfg.sample_size(n)`."""
    if n < cfg.k:
        raise ValueError(f"k={cfg.k} clusters need at least {cfg.k} rows, got {n}: lower k")
    rng = np.random.default_rng(cfg.seed)
    if cfg.init == "random":
        rows = rng.choice(n, size=cfg.k, replace=False)
        order = np.argsort(rows)
        got = unit64(take(rows[order]))
        vecs = np.empty_like(got)
        vecs[order] = got
        return vecs
    rows = np.sort(rng.choice(n, size=cfg.sample_size(n), replace=False))
    return kmeans_plus_plus(unit64(take(rows)), cfg.k, rng)


def kmeans_plus_plus(s_MD: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of the unit sample `s_MD`, each drawn with probability proportional to its squared
    distance (2 - 2 cos) to the nearest one already drawn (Arthur & Vassilvitskii 2007); when all
    remaining rows coincide with drawn ones, uniformly among the rows not drawn yet."""
    chosen = [int(rng.integers(len(s_MD)))]
    d2 = np.full(len(s_MD), np.inf)
    for _ in range(k - 1):
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (s_MD @ s_MD[chosen[-1]]), 0.0))
        d2[chosen[-1]] = 0.0
        total = d2.sum()
        if total > 0:
            chosen.append(int(rng.choice(len(s_MD), p=d2 / total)))
        else:
            chosen.append(int(rng.choice(np.setdiff1d(np.arange(len(s_MD)), chosen))))
    return s_MD[chosen].copy()


def lloyd(x_ND: np.ndarray, cfg: LloydConfig, *, init_KD: np.ndarray | None = None) -> KMeansResult:
    """Cluster the rows of `x_ND` (L2-normalised; kept as float16, as the vector store keeps them)
    in this process: the reference that `scale.dkmeans` equals from the same initial centroids."""
    x16 = np.ascontiguousarray(x_ND, dtype=np.float16)
    if x16.ndim != 2:
        raise ValueError(f"x must be a 2-D [N, D] matrix, got shape {x16.shape}")
    shard = Shard(x16, 0, cfg.blocks(*x16.shape))
    init = init_KD if init_KD is not None else init_centroids(shard.take, len(x16), cfg)
    if len(init) != cfg.k:
        raise ValueError(f"init_KD has {len(init)} rows for k={cfg.k}: give one initial centroid per cluster")
    c32, total = iterate(lambda c: [shard.partials(c)], lambda m: [shard.farthest(m)], init, cfg.niter)
    assign = shard.assign_N.astype(np.int64)
    return KMeansResult(c32, assign, shard.score_N.copy(), total.inertia, total.similarity, True)
