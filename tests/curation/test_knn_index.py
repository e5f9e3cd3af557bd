"""Exact and IVF inner-product search against brute-force numpy, and the copy-pair graph."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from lvd.curation.knn_index import IndexConfig, build_index, search, similar_pairs


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def brute_force(pool: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ pool.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_exact_search_matches_brute_force():
    pool, queries = random_unit(3000, 48, 0), random_unit(200, 48, 1)
    index = build_index(pool, IndexConfig(exact_below=10_000))
    assert isinstance(index, faiss.IndexFlatIP)
    nb = search(index, queries, 10)
    sims, ids = brute_force(pool, queries, 10)
    np.testing.assert_array_equal(nb.ids_QK, ids)
    np.testing.assert_allclose(nb.sims_QK, sims, atol=1e-5)


def test_float16_input_is_accepted_and_searched_as_float32():
    pool = random_unit(500, 32, 2).astype(np.float16)
    nb = search(build_index(pool), pool[:20], 1)
    np.testing.assert_array_equal(nb.ids_QK[:, 0], np.arange(20))


def test_ivf_above_threshold_recall_against_exact():
    pool, queries = random_unit(20_000, 32, 3), random_unit(300, 32, 4)
    cfg = IndexConfig(exact_below=10_000, nlist=64, nprobe=32, seed=0)
    index = build_index(pool, cfg)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == 64 and index.ntotal == 20_000
    k = 10
    _, exact = brute_force(pool, queries, k)
    approx = search(index, queries, k).ids_QK
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
    assert recall > 0.9, recall  # uniform random data is IVF's worst case
    # Probing every list is exhaustive: IVF then returns exactly the brute-force neighbours.
    full = build_index(pool, IndexConfig(exact_below=10_000, nlist=64, nprobe=64, seed=0))
    np.testing.assert_array_equal(search(full, queries, k).ids_QK, exact)


def test_ivf_is_deterministic_for_a_seed():
    pool, queries = random_unit(6000, 16, 5), random_unit(50, 16, 6)
    cfg = IndexConfig(exact_below=0, nlist=32, nprobe=2, seed=7)
    a = search(build_index(pool, cfg), queries, 5)
    b = search(build_index(pool, cfg), queries, 5)
    np.testing.assert_array_equal(a.ids_QK, b.ids_QK)


def test_search_pads_when_pool_is_smaller_than_k():
    pool = random_unit(3, 8, 7)
    nb = search(build_index(pool), pool[:2], 5)
    assert (nb.ids_QK[:, 3:] == -1).all() and np.isneginf(nb.sims_QK[:, 3:]).all()
    assert sorted(nb.ids_QK[0, :3]) == [0, 1, 2] and nb.ids_QK[0, 0] == 0


def test_unnormalised_input_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32) * 3)


def test_similar_pairs_finds_exactly_the_planted_copies():
    rng = np.random.default_rng(8)
    pool = random_unit(2000, 64, 9)
    originals = np.arange(0, 100, 10)  # rows 0, 10, ..., 90 get a near-copy at rows 2000+
    copies = unit(pool[originals] + 0.02 * rng.standard_normal((len(originals), 64)))
    x = np.concatenate([pool, copies])
    pairs = similar_pairs(x, build_index(x), k=8, threshold=0.9)
    assert list(zip(pairs.a, pairs.b)) == [(int(o), 2000 + i) for i, o in enumerate(originals)]
    expected = np.einsum("nd,nd->n", x[pairs.a], x[pairs.b])
    np.testing.assert_allclose(pairs.sims, expected, atol=1e-5)
    assert (pairs.sims > 0.9).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"nprobe": 0}, "nprobe"), ({"nlist": 0}, "nlist"), ({"exact_below": -1}, "exact_below")],
)
def test_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


def test_default_nlist_grows_with_sqrt_of_pool():
    cfg = IndexConfig()
    assert cfg.lists_for(1_000_000) == 4000 and cfg.lists_for(10) == 10 and cfg.lists_for(1) == 1
