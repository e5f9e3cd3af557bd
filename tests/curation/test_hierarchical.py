"""Hierarchical k-means tree, water filling by hand, and balanced sampling that flattens a
skewed mixture compared with random sampling."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.curation.hierarchical import (
    HierarchicalConfig,
    balanced_sample,
    hierarchical_kmeans,
    take_per_group,
    water_fill,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def skewed():
    """16 concepts on the sphere with Zipf-like frequencies (the largest holds ~40% of points)."""
    rng = np.random.default_rng(0)
    k, n, d = 16, 12_000, 32
    centres = unit(rng.standard_normal((k, d)))
    weights = 1.0 / np.arange(1, k + 1) ** 1.5
    labels = rng.choice(k, size=n, p=weights / weights.sum())
    x = unit(centres[labels] + 0.15 * rng.standard_normal((n, d)))
    cfg = HierarchicalConfig(ks=(120, 30, 8), seed=0)
    return x, labels, hierarchical_kmeans(x, cfg), cfg


def entropy(labels: np.ndarray, k: int) -> float:
    p = np.bincount(labels, minlength=k) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_water_fill_by_hand():
    rng = np.random.default_rng(0)
    sizes = np.array([1, 5, 10])
    np.testing.assert_array_equal(water_fill(sizes, 9, rng), [1, 4, 4])  # even share 4, the 1 gives all
    np.testing.assert_array_equal(water_fill(sizes, 16, rng), sizes)  # budget covers everything
    np.testing.assert_array_equal(water_fill(sizes, 100, rng), sizes)
    np.testing.assert_array_equal(water_fill(sizes, 0, rng), [0, 0, 0])
    ten = water_fill(sizes, 10, rng)  # share 4 plus one leftover unit for one of the two open groups
    assert ten.sum() == 10 and ten[0] == 1 and sorted(ten[1:]) == [4, 5]
    np.testing.assert_array_equal(water_fill(np.array([0, 7, 2]), 6, rng), [0, 4, 2])


def test_take_per_group_by_hand():
    group = np.array([0, 1, 0, 1, 0, 2])
    key = np.array([3.0, 1.0, 1.0, 0.5, 2.0, 9.0])
    # group 0 keeps its 2 smallest keys (rows 2, 4), group 1 one (row 3), group 2 none
    np.testing.assert_array_equal(take_per_group(group, key, np.array([2, 1, 0])), [2, 3, 4])
    np.testing.assert_array_equal(take_per_group(group, key, np.array([9, 9, 9])), np.arange(6))


def test_tree_levels_are_consistent(skewed):
    x, _, h, cfg = skewed
    assert [len(lvl.centroids_KD) for lvl in h.levels] == [120, 30, 8]
    assert [len(lvl.assign) for lvl in h.levels] == [12_000, 120, 30]
    assert [lvl.resampling_steps_run for lvl in h.levels] == [0, 10, 10]  # defaults: none at level 1
    for level in (1, 2, 3):
        assert h.sizes(level).sum() == 12_000
    # a point's level-3 cluster is its level-1 cluster's level-2 cluster's level-3 cluster
    lab1 = h.labels(1)
    np.testing.assert_array_equal(h.labels(3), h.levels[2].assign[h.levels[1].assign[lab1]])
    sims = x @ h.levels[0].centroids_KD.T
    np.testing.assert_array_equal(lab1, sims.argmax(axis=1))
    np.testing.assert_allclose(h.score_N, sims.max(axis=1), atol=1e-5)


def test_balanced_sampling_splits_budget_evenly_at_the_top(skewed):
    _, _, h, _ = skewed
    picked = balanced_sample(h, 1200, seed=0)
    assert len(picked) == 1200 and len(np.unique(picked)) == 1200
    got = np.bincount(h.labels(3)[picked], minlength=8)
    full = h.sizes(3)
    # water filling: clusters below the share give everything, the others get the share (+-1)
    open_ = got < full
    assert open_.any() and got[open_].max() - got[open_].min() <= 1
    assert (got[~open_] <= got[open_].min() + 1).all()


def test_balanced_sampling_flattens_a_skewed_mixture_vs_random(skewed):
    _, labels, h, _ = skewed
    target = 1200
    picked = balanced_sample(h, target, seed=0)
    random = np.random.default_rng(0).choice(len(labels), size=target, replace=False)
    share_balanced = np.bincount(labels[picked], minlength=16).max() / target
    share_random = np.bincount(labels[random], minlength=16).max() / target
    assert entropy(labels[picked], 16) > entropy(labels[random], 16) + 0.2
    assert share_balanced < 0.5 * share_random
    assert len(np.unique(labels[picked])) == 16  # every concept, even the rarest, is present


def test_closest_strategy_takes_points_nearest_their_centroid(skewed):
    _, _, h, _ = skewed
    picked = balanced_sample(h, 120, seed=0, strategy="closest")
    leaf = h.levels[0].assign
    for c in np.unique(leaf[picked])[:10]:
        members = np.flatnonzero(leaf == c)
        chosen = np.intersect1d(picked, members)
        rest = np.setdiff1d(members, chosen)
        if len(rest):
            assert h.score_N[chosen].min() >= h.score_N[rest].max()


def test_deterministic_for_a_seed(skewed):
    x, _, h, cfg = skewed
    again = hierarchical_kmeans(x, cfg)
    for a, b in zip(h.levels, again.levels):
        np.testing.assert_array_equal(a.centroids_KD, b.centroids_KD)
        np.testing.assert_array_equal(a.assign, b.assign)
    np.testing.assert_array_equal(balanced_sample(h, 500, seed=3), balanced_sample(again, 500, seed=3))
    assert not np.array_equal(balanced_sample(h, 500, seed=3), balanced_sample(h, 500, seed=4))


def test_budget_above_pool_returns_every_point(skewed):
    _, _, h, _ = skewed
    np.testing.assert_array_equal(balanced_sample(h, 50_000), np.arange(12_000))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ks": (10, 20)}, "fewer clusters"),
        ({"ks": ()}, "one positive k"),
        ({"ks": (10, 2), "sample_sizes": (3,)}, "one value per level"),
        ({"ks": (10, 2), "sample_strategy": "far"}, "sample_strategy"),
    ],
)
def test_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalConfig(**kwargs)


def dominant_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One dominant concept (3,000 near copies of 30 variants of one image class, 2/3 of the
    pool) and a long tail of 100 concepts with 15 images each; label 0 is the dominant one."""
    rng = np.random.default_rng(seed)
    d = 32
    variants = unit(unit(rng.standard_normal((1, d))) + 0.25 * rng.standard_normal((30, d)))
    dominant = unit(variants[rng.integers(0, 30, 3000)] + 0.05 * rng.standard_normal((3000, d)))
    tail_centres = unit(rng.standard_normal((100, d)))
    tail = unit(tail_centres[np.repeat(np.arange(100), 15)] + 0.15 * rng.standard_normal((1500, d)))
    return np.concatenate([dominant, tail]), np.r_[np.zeros(3000, int), 1 + np.repeat(np.arange(100), 15)]


def dominant_leaves(h, labels: np.ndarray) -> int:
    """Level-1 clusters whose members are mostly the dominant concept."""
    share = np.bincount(h.levels[0].assign, weights=labels == 0, minlength=len(h.levels[0].centroids_KD))
    return int((share / np.maximum(1, h.sizes(1)) > 0.5).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampling_moves_centroids_and_mass_off_the_dominant_concept(seed):
    """Vo et al. sec. 4: resampling spreads the centroids towards a uniform cover, so the dense
    concept holds fewer clusters and balanced sampling gives it less mass than the same tree
    without resampling, which already gives it less than random sampling."""
    x, labels = dominant_pool(seed)
    plain = hierarchical_kmeans(x, HierarchicalConfig(ks=(50, 8), resampling_steps=(0, 0), seed=seed))
    resampled = hierarchical_kmeans(x, HierarchicalConfig(ks=(50, 8), resampling_steps=(5, 5), seed=seed))
    assert [lvl.resampling_steps_run for lvl in resampled.levels] == [5, 5]
    # the resampled level-1 centroids are the ones the points were assigned to, and moved
    sims = x @ resampled.levels[0].centroids_KD.T
    np.testing.assert_array_equal(resampled.levels[0].assign, sims.argmax(axis=1))
    assert dominant_leaves(resampled, labels) <= 0.6 * dominant_leaves(plain, labels)  # 24-25 -> 11-12
    target = 600
    mass = {
        "random": (labels[np.random.default_rng(seed).choice(len(x), target, replace=False)] == 0).mean(),
        "plain": (labels[balanced_sample(plain, target, seed=seed)] == 0).mean(),
        "resampled": (labels[balanced_sample(resampled, target, seed=seed)] == 0).mean(),
    }
    assert mass["random"] > 0.6  # 2/3 of the pool
    assert mass["plain"] < 0.6 * mass["random"]  # measured 0.20-0.36
    assert mass["resampled"] < 0.8 * mass["plain"]  # measured 0.12-0.23
