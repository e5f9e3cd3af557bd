"""Decontamination: drop every pool image whose duplicate component touches an evaluation image.

Oquab et al. 2023 (app. A) remove from the pool every image with cosine > 0.45 to any image of
an evaluation set, together with its whole duplicate component (a copy of a test image that
dedup folded into another group must not survive as that group's representative).

Only the nearest evaluation image of each pool image matters (is the best cosine above the
threshold?), so the evaluation vectors go into a knn_index index (small: exact below
`IndexConfig.exact_below`) and the pool is searched against it with k=1, block by block, so the
pool (a memory-mapped vector store) never has to sit in RAM as float32. No all-pairs matrix.

Output (`DECONTAM_SCHEMA`, sorted by uid): one row per removed pool image: `uid`,
`matched_eval_uid` and `similarity`. An image that itself matched names its own nearest
evaluation image; a component member that did not names the component's best match (highest
cosine, then the earliest pool row), with that similarity.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa

from lvd.curation.knn_index import IndexConfig, build_index, search

DECONTAM_SCHEMA = pa.schema([("uid", pa.string()), ("matched_eval_uid", pa.string()), ("similarity", pa.float64())])
DEFAULT_THRESHOLD = 0.45  # the paper's cosine for its SSCD embeddings; calibrate per backbone


class Matches(NamedTuple):
    """Pool rows whose nearest evaluation image is above the threshold."""

    rows: np.ndarray  # int64 [M] pool row positions
    eval_rows: np.ndarray  # int64 [M] their nearest evaluation row
    sims: np.ndarray  # float64 [M] cosine to it


def eval_matches(pool_vecs_ND, eval_index, threshold: float, *, block_rows: int = 65_536) -> Matches:
    """k=1 search of every pool row against the evaluation index, in blocks; keep sim > threshold."""
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: use a positive number of rows")
    parts = []
    for start in range(0, len(pool_vecs_ND), block_rows):
        nb = search(eval_index, np.asarray(pool_vecs_ND[start : start + block_rows]), 1)
        hit = np.flatnonzero(nb.sims_QK[:, 0] > threshold)
        parts.append((start + hit, nb.ids_QK[hit, 0], nb.sims_QK[hit, 0].astype(np.float64)))
    if not parts:
        return Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    rows, eval_rows, sims = (np.concatenate(p) for p in zip(*parts))
    return Matches(rows.astype(np.int64), eval_rows.astype(np.int64), sims)


def contaminated(
    pool_vecs_ND,
    eval_vecs_ED,
    pool_components,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    pool_uids,
    eval_uids,
    index_cfg: IndexConfig | None = None,
    block_rows: int = 65_536,
) -> pa.Table:
    """Pool images to remove (DECONTAM_SCHEMA): each one above `threshold` to an evaluation image,
    and every member of its component.

    `pool_components[i]` is pool row i's component: any label equal within a duplicate group
    (component id, or the representative uid from `components_from_duplicates`). Vectors are
    L2-normalised ([N, D] pool, [E, D] evaluation; float16 memory maps are fine).
    """
    pool_uids = np.asarray(pool_uids, dtype=object)
    eval_uids = np.asarray(eval_uids, dtype=object)
    labels = np.asarray(pool_components)
    _check(pool_vecs_ND, eval_vecs_ED, labels, pool_uids, eval_uids, threshold)
    if len(eval_uids) == 0 or len(pool_uids) == 0:
        return DECONTAM_SCHEMA.empty_table()
    index = build_index(eval_vecs_ED, index_cfg)
    m = eval_matches(pool_vecs_ND, index, threshold, block_rows=block_rows)
    _, comp = np.unique(labels, return_inverse=True)
    comp = comp.reshape(-1)
    # per touched component, its best match: sort by (component, -sim, row) and take the first
    order = np.lexsort((m.rows, -m.sims, comp[m.rows]))
    first = np.ones(len(order), bool)
    first[1:] = comp[m.rows[order]][1:] != comp[m.rows[order]][:-1]
    best = order[first]
    best_of = dict(zip(comp[m.rows[best]].tolist(), best.tolist()))
    removed = np.flatnonzero(np.isin(comp, list(best_of)))
    pick = np.array([best_of[c] for c in comp[removed].tolist()], dtype=np.int64)
    own = np.full(len(pool_uids), -1, np.int64)
    own[m.rows] = np.arange(len(m.rows))
    pick = np.where(own[removed] >= 0, own[removed], pick)
    table = pa.table(
        {
            "uid": pa.array(pool_uids[removed].tolist(), pa.string()),
            "matched_eval_uid": pa.array(eval_uids[m.eval_rows[pick]].tolist(), pa.string()),
            "similarity": pa.array(m.sims[pick], pa.float64()),
        },
        schema=DECONTAM_SCHEMA,
    )
    return table.sort_by([("uid", "ascending")])


def _check(pool_vecs_ND, eval_vecs_ED, labels, pool_uids, eval_uids, threshold) -> None:
    if not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold}: use a cosine in [-1, 1) (paper: 0.45)")
    if not (len(pool_vecs_ND) == len(pool_uids) == len(labels)) or labels.ndim != 1:
        raise ValueError(f"pool: {len(pool_vecs_ND)} vectors, {len(pool_uids)} uids, {labels.shape} component labels: want one each per row")
    if len(eval_vecs_ED) != len(eval_uids):
        raise ValueError(f"eval: {len(eval_vecs_ED)} vectors for {len(eval_uids)} uids")
    if len(pool_vecs_ND) and len(eval_vecs_ED) and np.shape(pool_vecs_ND)[1] != np.shape(eval_vecs_ED)[1]:
        raise ValueError(f"pool dimension {np.shape(pool_vecs_ND)[1]} != eval {np.shape(eval_vecs_ED)[1]}: embed both with one backbone")


def components_from_duplicates(pool_uids, duplicates: pa.Table) -> np.ndarray:
    """Component label per pool uid from a dedup table (uid, duplicate_of): the representative
    uid for a duplicate, the uid itself otherwise (a representative labels its own group)."""
    rep = dict(zip(duplicates["uid"].to_pylist(), duplicates["duplicate_of"].to_pylist()))
    return np.array([rep.get(u, u) for u in np.asarray(pool_uids, dtype=object).tolist()], dtype=object)
