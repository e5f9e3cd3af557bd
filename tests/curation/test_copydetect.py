"""Embedding copy edges on hand-built vectors, their union with pHash edges, threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.curation.copydetect import CopyDetectConfig, calibrate_threshold, embedding_edges, separation
from lvd.curation.dedup import EdgeSet, resolve
from lvd.curation.knn_index import IndexConfig

D = 16


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted() -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """Rows 0..15 are the basis e_i (pairwise cosine 0) plus planted copies; expected edges at 0.6."""
    e = np.eye(D)
    extra = [
        e[3],  # row 16: exact copy of row 3
        unit(e[5] + 0.2 * e[7]),  # row 17: near copy of row 5, cosine 1/sqrt(1.04)
        unit(e[9] + 1.5 * e[10]),  # row 18: cosine 0.555 to row 9 (no edge), 0.832 to row 10
    ]
    vecs = np.vstack([e, extra])
    want = {(3, 16): 1.0, (5, 17): 1 / np.sqrt(1.04), (10, 18): 1.5 / np.sqrt(3.25)}
    return vecs, want


@pytest.mark.parametrize("index_cfg", [None, IndexConfig(exact_below=0, nlist=4, nprobe=4)], ids=["exact", "ivf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_planted_copies_are_the_only_edges(index_cfg, dtype):
    vecs, want = planted()
    edges = embedding_edges(vecs.astype(dtype), CopyDetectConfig(k=4, threshold=0.6), index_cfg)
    assert edges.method == "embedding"
    got = {(int(a), int(b)): 1 - d for a, b, d in zip(edges.a, edges.b, edges.distance)}
    assert sorted(got) == sorted(want)
    tol = 1e-6 if dtype == np.float32 else 2e-3
    for pair, cos in want.items():
        assert got[pair] == pytest.approx(cos, abs=tol)
    assert (edges.distance >= 0).all()


def test_threshold_moves_the_borderline_pair():
    vecs, want = planted()
    low = embedding_edges(vecs, CopyDetectConfig(k=4, threshold=0.5))
    assert {(int(a), int(b)) for a, b in zip(low.a, low.b)} == set(want) | {(9, 18)}


def test_k_bounds_the_neighbours_examined():
    # rows 1..4 = e0 tilted by 0.1..0.4 towards e_i: each one's nearest other row is row 0
    # (cosine 1/sqrt(1+a^2) beats 1/sqrt((1+a^2)(1+b^2)) to any other tilted row)
    e = np.eye(D)
    vecs = np.vstack([e[0]] + [unit(e[0] + a * e[i]) for i, a in zip(range(1, 5), (0.1, 0.2, 0.3, 0.4))] + [e[5:]])
    star = embedding_edges(vecs, CopyDetectConfig(k=1, threshold=0.6))
    assert sorted(zip(star.a.tolist(), star.b.tolist())) == [(0, 1), (0, 2), (0, 3), (0, 4)]
    full = embedding_edges(vecs, CopyDetectConfig(k=4, threshold=0.6))
    assert len(full) == 10 and set(full.a) | set(full.b) == set(range(5))
    table = resolve([f"u{i}" for i in range(len(vecs))], np.ones(len(vecs)), [star])
    assert table["duplicate_of"].to_pylist() == ["u0"] * 4  # one component, smallest uid


def test_embedding_edges_join_phash_edges_in_resolve():
    vecs, _ = planted()
    emb = embedding_edges(vecs, CopyDetectConfig(k=4, threshold=0.6))
    phash = EdgeSet("phash", [17], [0], [3.0])  # row 17 also a pHash duplicate of row 0
    uids = [f"u{i:02d}" for i in range(len(vecs))]
    pixels = np.full(len(vecs), 100)
    pixels[18] = 500  # the copy 18 is larger than its original 10: it represents the group
    rows = {r["uid"]: r for r in resolve(uids, pixels, [phash, emb]).to_pylist()}
    assert rows["u10"]["duplicate_of"] == "u18" and rows["u10"]["method"] == "embedding"
    assert rows["u10"]["distance"] == pytest.approx(1 - 1.5 / np.sqrt(3.25), abs=1e-6)
    assert rows["u16"]["duplicate_of"] == "u03" and rows["u16"]["distance"] == pytest.approx(0, abs=1e-6)
    # 0 -phash- 17 -embedding- 5: one group, representative smallest uid u00
    assert rows["u05"]["duplicate_of"] == "u00" and rows["u05"]["method"] == "embedding"
    assert rows["u17"]["method"] == "phash" and rows["u17"]["distance"] == 3.0
    assert sorted(rows) == ["u05", "u10", "u16", "u17"]


def test_fewer_than_two_vectors_give_no_edges():
    assert len(embedding_edges(np.eye(4)[:1], CopyDetectConfig())) == 0


def test_calibrate_separable_synthetic_distributions():
    rng = np.random.default_rng(0)
    copy = np.clip(rng.normal(0.85, 0.05, 2000), -1, 1)
    distinct = np.clip(rng.normal(0.2, 0.08, 20000), -1, 1)
    assert copy.min() > distinct.max()  # the synthetic sets do separate
    t = calibrate_threshold(copy, distinct)
    assert t == pytest.approx((copy.min() + distinct.max()) / 2)
    assert separation(copy, distinct, t) == (1.0, 0.0)


def test_calibrate_overlapping_by_hand():
    distinct, copy = [0.1, 0.2, 0.3, 0.9], [0.5, 0.8, 0.95]
    assert calibrate_threshold(copy, distinct) == pytest.approx(0.925)  # no false link allowed
    assert calibrate_threshold(copy, distinct, max_false_rate=0.25) == pytest.approx(0.4)  # one of four may link
    assert separation(copy, distinct, 0.4) == (1.0, 0.25)
    with pytest.raises(ValueError, match="cannot detect copies"):
        calibrate_threshold([0.1, 0.2], [0.5])


def test_config_validation():
    with pytest.raises(ValueError, match="k=0"):
        CopyDetectConfig(k=0)
    with pytest.raises(ValueError, match="threshold=1.5"):
        CopyDetectConfig(threshold=1.5)
