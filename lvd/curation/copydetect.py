"""Embedding copy detection: k nearest neighbours above a cosine threshold, as dedup edges.

Oquab et al. 2023 (app. A) link every image to those of its k=64 nearest neighbours (by cosine
of the copy-detection embedding) whose similarity exceeds 0.6, then take connected components.
Here the edges come back as a `dedup.EdgeSet(method="embedding", distance=1 - cosine)` over
row positions of the same table the pHash edges use, and `dedup.resolve` unions both.

The threshold belongs to the backbone: cosine scales differ between models (a randomly
initialised ViT maps every photo to nearly the same direction, so its similarities say nothing).
Calibrate it per backbone with `calibrate_threshold` on labelled pairs: embed real photos and
their transformed copies (`lvd.curation.copies.real_photos` + `make_copies`: resized,
recompressed, re-encoded, brightened, cropped), take the cosines of (photo, its copy) pairs as
`copy_sims` and of (photo, other photo) pairs as `distinct_sims`, and pick the midpoint of the
gap between them; `benchmarks/embed.py --backbone SPEC` does this and prints both
distributions. The default 0.6 is the paper's value for its SSCD copy-detection model; no
learned lvd backbone existed when this was written, so it is not yet re-measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lvd.curation.dedup import EdgeSet
from lvd.curation.knn_index import IndexConfig, build_index, similar_pairs

METHOD = "embedding"


@dataclass(frozen=True, kw_only=True)
class CopyDetectConfig:
    k: int = 64  # neighbours examined per image (paper: 64)
    threshold: float = 0.6  # cosine above which a neighbour is a copy (paper: 0.6; calibrate per backbone)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: examine at least one neighbour (paper: 64)")
        if not -1.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold={self.threshold}: use a cosine in [-1, 1); calibrate_threshold() picks one")


def embedding_edges(vecs_ND: np.ndarray, cfg: CopyDetectConfig | None = None, index_cfg: IndexConfig | None = None) -> EdgeSet:
    """Copy edges (a < b, row positions of `vecs_ND`) with distance 1 - cosine.

    `vecs_ND` are L2-normalised (float16 from the vector store is fine; the index holds a float32
    copy: 4*D bytes per vector). A pair is an edge when either row has the other among its k
    nearest neighbours with cosine > threshold; exact search below `index_cfg.exact_below`
    vectors, IVF above it (approximate: recall measured in benchmarks/knn_search.py).
    """
    cfg = cfg or CopyDetectConfig()
    if len(vecs_ND) < 2:
        return EdgeSet(METHOD, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    index = build_index(vecs_ND, index_cfg)
    pairs = similar_pairs(vecs_ND, index, k=cfg.k, threshold=cfg.threshold)
    # float32 cosines of unit vectors can exceed 1 by rounding: keep distances >= 0
    distance = np.clip(1.0 - pairs.sims.astype(np.float64), 0.0, 2.0)
    return EdgeSet(METHOD, pairs.a, pairs.b, distance)


def calibrate_threshold(copy_sims, distinct_sims, *, max_false_rate: float = 0.0) -> float:
    """A cosine threshold separating copy pairs (should be linked) from distinct pairs (should not).

    Let `hi` be the largest distinct similarity that must stay at or below the threshold: the
    maximum when `max_false_rate` is 0, else the value with at most that fraction of distinct
    pairs above it. The threshold is the midpoint between `hi` and the smallest copy similarity
    above `hi` (the widest margin that keeps every such copy), so `sim > threshold` links those
    copies and at most `max_false_rate` of distinct pairs. False merges are favoured against
    because union-find chains them into large wrong groups; missed copies only cost a duplicate.
    Raises when no copy similarity exceeds `hi`: this backbone cannot tell copies apart.
    """
    copy = np.asarray(copy_sims, dtype=np.float64).ravel()
    distinct = np.sort(np.asarray(distinct_sims, dtype=np.float64).ravel())[::-1]
    if not len(copy) or not len(distinct):
        raise ValueError("need at least one copy pair and one distinct pair to calibrate")
    if not 0.0 <= max_false_rate < 1.0:
        raise ValueError(f"max_false_rate={max_false_rate}: use a fraction in [0, 1)")
    hi = distinct[int(np.floor(max_false_rate * len(distinct)))]
    above = copy[copy > hi]
    if not len(above):
        raise ValueError(
            f"no copy pair is more similar than the distinct pairs' {hi:.4f} (copies: max {copy.max():.4f}): "
            "this backbone cannot detect copies; use a learned (copy-detection) model"
        )
    return float((hi + above.min()) / 2.0)


def separation(copy_sims, distinct_sims, threshold: float) -> tuple[float, float]:
    """(share of copy pairs linked, share of distinct pairs falsely linked) at `threshold`."""
    copy, distinct = np.asarray(copy_sims, np.float64), np.asarray(distinct_sims, np.float64)
    return float(np.mean(copy > threshold)), float(np.mean(distinct > threshold))
