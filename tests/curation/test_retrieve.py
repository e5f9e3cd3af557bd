"""Sample-based retrieval of planted neighbours, collisions and caps; the cluster-based rule
(> 3 seeds) on separated blobs; balanced retrieval provenance."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.curation.hierarchical import HierarchicalConfig, hierarchical_kmeans
from lvd.curation.kmeans import KMeansConfig, kmeans
from lvd.curation.knn_index import IndexConfig, build_index
from lvd.curation.retrieve import (
    BalancedConfig,
    ClusterRetrievalConfig,
    SampleRetrievalConfig,
    balanced,
    cluster_based,
    sample_based,
    union,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    """A random pool with, for each of 10 seeds, one near copy planted at a known row."""
    rng = np.random.default_rng(0)
    pool = unit(rng.standard_normal((5000, 64)))
    seeds = unit(rng.standard_normal((10, 64)))
    rows = rng.choice(5000, size=10, replace=False)
    pool[rows] = unit(seeds + 0.05 * rng.standard_normal((10, 64)))
    return pool, seeds, rows


def test_sample_based_finds_the_planted_neighbour(planted):
    pool, seeds, rows = planted
    res = sample_based(build_index(pool), seeds, SampleRetrievalConfig(k=1))
    order = np.argsort(rows)
    np.testing.assert_array_equal(res.pool_idx, rows[order])
    np.testing.assert_array_equal(res.seed_idx, np.arange(10)[order])
    np.testing.assert_allclose(
        res.similarity, np.einsum("nd,nd->n", pool[res.pool_idx], seeds[res.seed_idx]), atol=1e-5
    )
    assert (res.similarity > 0.9).all() and (res.cluster_id == -1).all() and res.method == "sample"
    assert res.counts.n_hits == 10 and res.counts.n_collisions == 0 and res.counts.n_selected == 10
    assert len(res.seeds_included) == 0


def test_sample_based_counts_collisions_and_credits_the_closest_seed(planted):
    pool, seeds, rows = planted
    twin = unit(seeds[:1] + 0.2 * np.random.default_rng(1).standard_normal((1, 64)))
    both = np.concatenate([twin, seeds])  # seed 0 (twin) and seed 1 share their nearest image
    res = sample_based(build_index(pool), both, SampleRetrievalConfig(k=1))
    assert res.counts.n_hits == 11 and res.counts.n_collisions == 1 and res.counts.n_selected == 10
    shared = np.flatnonzero(res.pool_idx == rows[0])
    assert res.seed_idx[shared].tolist() == [1]  # the original seed is the more similar one


def test_sample_based_k4_with_cap_and_threshold(planted):
    pool, seeds, rows = planted
    index = build_index(pool, IndexConfig(exact_below=10_000))
    full = sample_based(index, seeds, SampleRetrievalConfig(k=4, include_seeds=True))
    sims = seeds @ pool.T
    expected = np.unique(np.argsort(-sims, axis=1)[:, :4])
    np.testing.assert_array_equal(full.pool_idx, expected)
    np.testing.assert_array_equal(full.seeds_included, np.arange(10))
    capped = sample_based(index, seeds, SampleRetrievalConfig(k=4, max_images=10))
    np.testing.assert_array_equal(capped.pool_idx, np.sort(rows))  # the planted copies are the most similar
    assert capped.counts.n_capped == full.counts.n_selected - 10
    strict = sample_based(index, seeds, SampleRetrievalConfig(k=4, min_similarity=0.9))
    np.testing.assert_array_equal(strict.pool_idx, np.sort(rows))


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(2)
    centres = unit(rng.standard_normal((6, 32)))
    labels = np.repeat(np.arange(6), 200)
    pool = unit(centres[labels] + 0.05 * rng.standard_normal((1200, 32)))
    clusters = kmeans(pool, KMeansConfig(k=6, seed=0, nredo=5))
    return pool, labels, centres, clusters


def seeds_near(centres: np.ndarray, per_blob: dict[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = np.concatenate([np.full(n, b) for b, n in per_blob.items()])
    return unit(centres[picks] + 0.05 * rng.standard_normal((len(picks), centres.shape[1])))


def test_cluster_based_takes_only_clusters_with_more_than_three_seeds(blobs):
    pool, labels, centres, clusters = blobs
    seeds = seeds_near(centres, {0: 4, 1: 3, 2: 5, 3: 1}, seed=3)  # blobs 0 and 2 qualify
    res = cluster_based(clusters, seeds, ClusterRetrievalConfig(per_cluster=50, include_seeds=True))
    assert res.counts.n_clusters == 2 and res.counts.n_selected == 100 and res.method == "cluster"
    assert np.bincount(labels[res.pool_idx], minlength=6).tolist() == [50, 0, 50, 0, 0, 0]
    np.testing.assert_array_equal(res.cluster_id, clusters.assign_N[res.pool_idx])
    np.testing.assert_allclose(res.similarity, clusters.score_N[res.pool_idx])
    np.testing.assert_array_equal(res.seeds_included, np.arange(13))
    # M larger than a cluster gives the whole cluster
    whole = cluster_based(clusters, seeds, ClusterRetrievalConfig(per_cluster=10_000))
    np.testing.assert_array_equal(whole.pool_idx, np.flatnonzero(np.isin(labels, [0, 2])))


def test_cluster_based_cap_is_split_evenly_and_closest_order_works(blobs):
    pool, labels, centres, clusters = blobs
    seeds = seeds_near(centres, {0: 4, 2: 5, 4: 6}, seed=4)
    cfg = ClusterRetrievalConfig(per_cluster=100, max_images=90, order="closest")
    res = cluster_based(clusters, seeds, cfg)
    assert np.bincount(labels[res.pool_idx], minlength=6).tolist() == [30, 0, 30, 0, 30, 0]
    assert res.counts.n_hits == 300 and res.counts.n_capped == 210
    for c in np.unique(res.cluster_id):
        rest = np.setdiff1d(clusters.members(c), res.pool_idx)
        assert clusters.score_N[res.pool_idx[res.cluster_id == c]].min() >= clusters.score_N[rest].max()


def test_cluster_based_is_deterministic_for_a_seed(blobs):
    _, _, centres, clusters = blobs
    seeds = seeds_near(centres, {1: 4}, seed=5)
    a = cluster_based(clusters, seeds, ClusterRetrievalConfig(per_cluster=20, seed=9))
    b = cluster_based(clusters, seeds, ClusterRetrievalConfig(per_cluster=20, seed=9))
    c = cluster_based(clusters, seeds, ClusterRetrievalConfig(per_cluster=20, seed=10))
    np.testing.assert_array_equal(a.pool_idx, b.pool_idx)
    assert not np.array_equal(a.pool_idx, c.pool_idx)


def test_balanced_retrieval_provenance(blobs):
    pool, labels, _, _ = blobs
    h = hierarchical_kmeans(pool, HierarchicalConfig(ks=(24, 6), seed=0))
    res = balanced(h, BalancedConfig(target=60))
    assert res.method == "balanced" and res.counts.n_selected == 60 and res.counts.n_seeds == 0
    np.testing.assert_array_equal(res.cluster_id, h.levels[0].assign[res.pool_idx])
    np.testing.assert_allclose(res.similarity, h.score_N[res.pool_idx])
    assert (res.seed_idx == -1).all() and np.all(np.diff(res.pool_idx) > 0)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="k=0"):
        SampleRetrievalConfig(k=0)
    with pytest.raises(ValueError, match="more than 3"):
        ClusterRetrievalConfig(min_seeds=0)
    with pytest.raises(ValueError, match="order"):
        ClusterRetrievalConfig(order="nearest")
    with pytest.raises(ValueError, match="target"):
        BalancedConfig(target=-1)


def test_union_keeps_each_image_once_with_the_first_retrievals_provenance(planted):
    pool, seeds, rows = planted
    index = build_index(pool)
    near = sample_based(index, seeds, SampleRetrievalConfig(k=1))  # the 10 planted rows
    wide = sample_based(index, seeds[:3], SampleRetrievalConfig(k=4))  # 12 rows, 3 of them planted
    sel = union([near, wide])
    expected = np.union1d(near.pool_idx, wide.pool_idx)
    np.testing.assert_array_equal(sel.pool_idx, expected)
    assert sel.n_overlaps == 3 and len(expected) == 10 + 12 - 3
    planted_rows = np.isin(sel.pool_idx, rows)
    assert (sel.source[planted_rows] == 0).all() and (sel.source[~planted_rows] == 1).all()
    assert set(sel.method) == {"sample"}
    np.testing.assert_allclose(
        sel.similarity, np.einsum("nd,nd->n", pool[sel.pool_idx], seeds[sel.seed_idx]), atol=1e-5
    )
    clusters = kmeans(pool, KMeansConfig(k=10, seed=0))
    by_cluster = cluster_based(clusters, seeds[:1], ClusterRetrievalConfig(min_seeds=1, per_cluster=5))
    mixed = union([by_cluster, near])
    assert list(mixed.method[mixed.source == 0]) == ["cluster"] * 5
    assert list(mixed.method[mixed.source == 1]) == ["sample"] * (len(mixed.pool_idx) - 5)
    np.testing.assert_array_equal(np.sort(mixed.pool_idx[mixed.source == 0]), by_cluster.pool_idx)
    assert len(union([]).pool_idx) == 0
