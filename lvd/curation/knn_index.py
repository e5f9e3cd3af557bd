"""Inner-product k-NN over L2-normalised embeddings (cosine similarity), exact or IVF.

Used by copy detection and decontamination to *propose* candidates (each image's k=64 nearest
neighbours, Oquab et al. 2023 app. A; `lvd.curation.copydetect` decides) and by sample-based
retrieval.

Pools smaller than `IndexConfig.exact_below` get an exact `IndexFlatIP`; larger ones an
`IndexIVFFlat` (inner product) whose coarse quantizer is trained on a seeded sample, searched
with `nprobe` of its `nlist` lists. IVF trades recall for speed: recall@k against exact search is
measured in benchmarks/knn_search.py. The index moves to the GPU when Faiss sees one
(`faiss.get_num_gpus() > 0`) unless `use_gpu=False`.

Memory (float32 vectors of dimension D, exclusive of Faiss's small fixed overhead):
- `IndexFlatIP`: 4*D bytes per vector. D=384 (ViT-S): 1536 B, 1.54 GB per million vectors;
  D=768 (ViT-B): 3.07 GB per million; D=1536 (ViT-g): 6.1 GB per million.
- `IndexIVFFlat`: 4*D + 8 bytes per vector (vector plus its int64 id in the inverted list), plus
  4*D*nlist for the centroids. D=384: 1544 B, 1.54 GB per million; D=768: 3.08 GB per million.
Search allocates 12*k bytes per query (float32 sims + int64 ids); queries go in batches of
`search(..., query_batch=)` so that stays bounded.

Results are canonical: the k most similar rows, ties broken by the lower id. Faiss itself keeps
whichever tied rows its scan met first (which depends on how the rows are laid out, so a
sharded index, `lvd.curation.scale.shardindex`, would disagree with one index), and its float32
inner products differ by an ulp with the batch's shape. So `search` asks Faiss for a few more
than k, re-scores exact (flat) candidates in float64 from the stored vectors, sorts by
(similarity, id), and searches again with more for the queries whose k-th similarity is within
`_SIM_SLACK` of the last one Faiss returned (a tie may continue past it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import faiss
import numpy as np

_NORM_TOLERANCE = 1e-2  # float16 storage leaves norms around 1 +- 1e-3
# Bound on Faiss's float32 rounding of a unit-vector inner product (d * 2**-24 at d = 1,536 is 9e-5).
_SIM_SLACK = 1e-4
_EXTRA = 16  # candidates asked beyond k, so most queries settle their ties in one Faiss call
_RESCORE_FLOATS = 1 << 22  # float64 values gathered at once when re-scoring (32 MiB)


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    exact_below: int = 200_000  # pools with fewer vectors get exact IndexFlatIP search
    nlist: int | None = None  # IVF lists; None: 4*sqrt(N) rounded, at least 1
    nprobe: int = 32  # IVF lists visited per query (more: better recall, slower)
    train_points_per_list: int = 64  # IVF quantizer trained on nlist * this many sampled vectors
    seed: int = 0  # sample of IVF training vectors and k-means init
    use_gpu: bool | None = None  # None: GPU when faiss.get_num_gpus() > 0

    def __post_init__(self):
        if self.exact_below < 0:
            raise ValueError(f"exact_below={self.exact_below}: use 0 (always IVF) or a pool size")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist={self.nlist}: use a positive number of lists, or None for 4*sqrt(N)")
        if self.nprobe < 1:
            raise ValueError(f"nprobe={self.nprobe}: use at least 1 list per query")
        if self.train_points_per_list < 1:
            raise ValueError(f"train_points_per_list={self.train_points_per_list}: use at least 1 (Faiss advises 39+)")

    def lists_for(self, n: int) -> int:
        """Number of IVF lists for a pool of `n` vectors (never more than `n`)."""
        nlist = self.nlist if self.nlist is not None else round(4 * math.sqrt(n))
        return max(1, min(nlist, n))


class Neighbours(NamedTuple):
    """k nearest pool rows per query, most similar first; id -1 / sim -inf pad missing ones."""

    sims_QK: np.ndarray  # float32 cosine similarities
    ids_QK: np.ndarray  # int64 pool row positions


def as_unit_float32(x_ND: np.ndarray, name: str = "x") -> np.ndarray:
    """`x_ND` as a C-contiguous float32 matrix, checked to be L2-normalised row by row.

    Inner product equals cosine only on unit vectors; a caller passing raw features would get
    silently wrong neighbours, so this raises instead.
    """
    x = np.ascontiguousarray(x_ND, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] matrix, got shape {x.shape}")
    if len(x):
        norms = np.linalg.norm(x, axis=1)
        worst = float(np.abs(norms - 1.0).max())
        if worst > _NORM_TOLERANCE:
            raise ValueError(
                f"{name} rows must be L2-normalised (a norm is off by {worst:.3g}); divide by np.linalg.norm(x, axis=1, keepdims=True)"
            )
    return x


def gpu_wanted(use_gpu: bool | None) -> bool:
    """True when Faiss should run on the GPU: asked for (or auto) and one is visible."""
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and ngpu == 0:
        raise RuntimeError("use_gpu=True but Faiss sees no GPU: install faiss-gpu, or set use_gpu=None/False")
    return ngpu > 0 and use_gpu is not False


def build_index(x_ND: np.ndarray, cfg: IndexConfig | None = None) -> faiss.Index:
    """An inner-product index over the rows of `x_ND` (L2-normalised); row i gets id i."""
    cfg = cfg or IndexConfig()
    x = as_unit_float32(x_ND)
    n, d = x.shape
    if n < cfg.exact_below or n == 0:
        index = faiss.IndexFlatIP(d)
    else:
        index = _trained_ivf(x, cfg)
    is_ivf = isinstance(index, faiss.IndexIVF)
    if gpu_wanted(cfg.use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    if is_ivf:
        space = faiss.GpuParameterSpace() if gpu_wanted(cfg.use_gpu) else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", cfg.nprobe)
    index.add(x)
    return index


def _trained_ivf(x: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    index = new_ivf(x.shape[1], cfg.lists_for(len(x)), cfg)
    index.train(x[training_rows(len(x), index.nlist, cfg)])
    return index


def new_ivf(d: int, nlist: int, cfg: IndexConfig, *, pq_m: int | None = None) -> faiss.IndexIVF:
    """An untrained inner-product IVF (IVF-PQ with `pq_m` bytes per code) whose k-means is seeded and spherical."""
    quantizer = faiss.IndexFlatIP(d)
    if pq_m is None:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg.seed
    index.cp.spherical = True  # unit centroids: list assignment by cosine, like the queries
    index.cp.max_points_per_centroid = cfg.train_points_per_list
    index.own_fields = True  # the index keeps its quantizer alive
    quantizer.this.disown()
    return index


def training_rows(n: int, nlist: int, cfg: IndexConfig) -> np.ndarray:
    """Sorted rows of a pool of `n` to train `nlist` lists on: a seeded sample, so the same pool
    always gives the same lists (Faiss would sample itself, from its own fixed seed)."""
    n_train = min(n, nlist * cfg.train_points_per_list)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, size=n_train, replace=False))


def search(index: faiss.Index, queries_QD: np.ndarray, k: int, *, query_batch: int = 16_384) -> Neighbours:
    """The `k` most similar indexed rows for every query (L2-normalised), best first.

    When the index holds fewer than `k` vectors (or IVF probes too few lists), missing neighbours
    come back as id -1 with similarity -inf.
    """
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one neighbour")
    q = as_unit_float32(queries_QD, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    sims = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(q) if index.ntotal else 0, query_batch):
        s, i = top_k(index, q[start : start + query_batch], k)
        sims[start : start + len(s)] = s
        ids[start : start + len(s)] = i
    return Neighbours(sims, ids)


def top_k(index: faiss.Index, q_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sims, ids) [Q, k] of float32 unit queries: canonical (ties by lower id), -inf / -1 padded."""
    rescore = isinstance(index, faiss.IndexFlat)
    sims = np.full((len(q_QD), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q_QD), k), -1, dtype=np.int64)
    todo, want = np.arange(len(q_QD)), min(index.ntotal, k + _EXTRA)
    while len(todo):
        raw_s, raw_i = index.search(q_QD[todo], want)
        s = _rescored(index, q_QD[todo], raw_i) if rescore else raw_s.copy()
        s[raw_i < 0] = -np.inf
        order = np.lexsort((raw_i, -s))[:, :k]
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(raw_i, order, 1)
        i[~np.isfinite(s)] = -1
        kth = s[:, -1] if s.shape[1] == k else np.full(len(s), -np.inf, np.float32)
        slack = _SIM_SLACK if rescore else 0.0
        # settled: Faiss listed every candidate, or its last one is clearly below the k-th
        settled = (want >= index.ntotal) | (raw_i[:, -1] < 0) | (raw_s[:, -1] < kth - slack)
        sims[todo[settled], : s.shape[1]] = s[settled]
        ids[todo[settled], : i.shape[1]] = i[settled]
        todo, want = todo[~settled], min(index.ntotal, 2 * want)
    return sims, ids


def _rescored(index: faiss.Index, q_QD: np.ndarray, ids_QK: np.ndarray) -> np.ndarray:
    """float32 [Q, K]: query . stored row, summed in float64 (the same value whatever the batch)."""
    out = np.full(ids_QK.shape, -np.inf, dtype=np.float32)
    step = max(1, _RESCORE_FLOATS // max(1, ids_QK.shape[1] * q_QD.shape[1]))
    for a in range(0, len(q_QD), step):
        i = ids_QK[a : a + step]
        rows = index.reconstruct_batch(np.maximum(i, 0).ravel()).reshape(*i.shape, -1).astype(np.float64)
        out[a : a + step] = np.einsum("qkd,qd->qk", rows, q_QD[a : a + step].astype(np.float64))
    return out


class Pairs(NamedTuple):
    """Undirected pairs of pool rows (a < b) with their cosine similarity."""

    a: np.ndarray  # int64 [E]
    b: np.ndarray  # int64 [E]
    sims: np.ndarray  # float32 [E]


def similar_pairs(x_ND: np.ndarray, index: faiss.Index, *, k: int, threshold: float) -> Pairs:
    """Pairs of rows of `x_ND` (the indexed pool itself) among each other's `k` nearest with
    cosine > `threshold`, self-matches dropped and each pair reported once (a < b).

    This is the copy-detection graph of Oquab et al. (k=64, cosine above a threshold); its edges
    feed a union-find. A pair found from both ends keeps the larger similarity.
    """
    nb = search(index, x_ND, k + 1)  # +1: each row finds itself first
    q_QK = np.broadcast_to(np.arange(len(nb.ids_QK))[:, None], nb.ids_QK.shape)
    keep = (nb.ids_QK >= 0) & (nb.ids_QK != q_QK) & (nb.sims_QK > threshold)
    return unique_pairs(q_QK[keep], nb.ids_QK[keep], nb.sims_QK[keep])


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> Pairs:
    """Directed hits (a, b, sim) as undirected pairs lo < hi, each once with its best similarity."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-s, hi, lo))  # per (lo, hi) the best similarity first
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return Pairs(lo[first].astype(np.int64), hi[first].astype(np.int64), s[first].astype(np.float32))
