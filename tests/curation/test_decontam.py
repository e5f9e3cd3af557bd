"""Decontamination on hand-built vectors: whole components go, each row names its eval match."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lvd.curation.decontam import DECONTAM_SCHEMA, components_from_duplicates, contaminated
from lvd.curation.knn_index import IndexConfig

D = 8


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x)


def scene():
    """Eval images E0 = e0, E1 = e1; pool rows with hand-computed cosines and components."""
    e = np.eye(D)
    pool = [
        ("p0", e[0], "A"),  # cosine 1 to E0
        ("p1", unit(e[0] + e[2]), "B"),  # 0.707 to E0
        ("p2", e[3], "A"),  # matches nothing; its component A does (via p0)
        ("p3", unit(e[1] + 2 * e[4]), "C"),  # 1/sqrt(5) = 0.447 to E1: just below 0.45, kept
        ("p4", unit(2 * e[1] + e[4]), "D"),  # 2/sqrt(5) = 0.894 to E1
        ("p5", e[5], "D"),  # removed with p4
        ("p6", e[6], "E"),  # kept
        ("p7", unit(e[1] + 0.5 * e[5]), "B"),  # 0.894 to E1: B's best match
        ("p8", e[7], "B"),  # removed with B, named after B's best match (p7 -> E1)
    ]
    uids, vecs, comps = zip(*pool)
    return list(uids), np.stack(vecs), np.array(comps, dtype=object), ["E0", "E1"], e[:2]


def expected():
    c, h = 2 / np.sqrt(5), 1 / np.sqrt(2)
    return [
        ("p0", "E0", 1.0), ("p1", "E0", h), ("p2", "E0", 1.0), ("p4", "E1", c),
        ("p5", "E1", c), ("p7", "E1", 1 / np.sqrt(1.25)), ("p8", "E1", 1 / np.sqrt(1.25)),
    ]  # fmt: skip


def rows(table: pa.Table):
    return [(r["uid"], r["matched_eval_uid"], r["similarity"]) for r in table.to_pylist()]


@pytest.mark.parametrize("block_rows", [2, 1000])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float16, 2e-3)])
def test_whole_components_removed_and_named(block_rows, dtype, tol):
    uids, pool, comps, eval_uids, evals = scene()
    table = contaminated(pool.astype(dtype), evals.astype(dtype), comps, 0.45, pool_uids=uids,
                         eval_uids=eval_uids, block_rows=block_rows)
    assert table.schema == DECONTAM_SCHEMA
    got, want = rows(table), expected()
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], atol=tol)


def test_threshold_decides_the_borderline_image():
    uids, pool, comps, eval_uids, evals = scene()
    table = contaminated(pool, evals, comps, 0.44, pool_uids=uids, eval_uids=eval_uids)
    assert ("p3", "E1") in [r[:2] for r in rows(table)]
    strict = contaminated(pool, evals, comps, 0.95, pool_uids=uids, eval_uids=eval_uids)
    assert [r[:2] for r in rows(strict)] == [("p0", "E0"), ("p2", "E0")]


def test_components_from_a_dedup_table():
    uids, pool, _, eval_uids, evals = scene()
    # dedup folded p0 (the eval copy) into p6's group: p6 must go although it matches nothing
    dups = pa.table({"uid": ["p0", "p2"], "duplicate_of": ["p6", "p6"]})
    comps = components_from_duplicates(uids, dups)
    assert comps.tolist() == ["p6", "p1", "p6", "p3", "p4", "p5", "p6", "p7", "p8"]
    table = contaminated(pool, evals, comps, pool_uids=uids, eval_uids=eval_uids,
                         index_cfg=IndexConfig(exact_below=0, nlist=1, nprobe=1))
    got = {r[0]: r[1:] for r in rows(table)}
    assert sorted(got) == ["p0", "p1", "p2", "p4", "p6", "p7"]
    assert got["p6"][0] == "E0" and got["p6"][1] == pytest.approx(1.0)


def test_integer_component_ids_and_empty_inputs():
    uids, pool, comps, eval_uids, evals = scene()
    ids = np.unique(comps, return_inverse=True)[1] * 7  # any labels equal within a group
    same = contaminated(pool, evals, ids, pool_uids=uids, eval_uids=eval_uids)
    assert rows(same) == rows(contaminated(pool, evals, comps, pool_uids=uids, eval_uids=eval_uids))
    assert contaminated(pool, evals[:0], comps, pool_uids=uids, eval_uids=[]).num_rows == 0
    assert contaminated(pool[:0], evals, comps[:0], pool_uids=[], eval_uids=eval_uids).num_rows == 0


def test_bad_inputs_say_what_to_fix():
    uids, pool, comps, eval_uids, evals = scene()
    with pytest.raises(ValueError, match="component labels"):
        contaminated(pool, evals, comps[:-1], pool_uids=uids, eval_uids=eval_uids)
    with pytest.raises(ValueError, match="one backbone"):
        contaminated(pool, np.eye(4)[:2], comps, pool_uids=uids, eval_uids=eval_uids)
    with pytest.raises(ValueError, match="L2-normalised"):
        contaminated(pool * 2, evals, comps, pool_uids=uids, eval_uids=eval_uids)
