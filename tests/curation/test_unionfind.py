"""Union-find against a brute-force reference (graph search), and representative choice."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.curation.unionfind import UnionFind, components, representative_rank


def _reference_groups(n: int, edges: list[tuple[int, int]]) -> set[frozenset[int]]:
    adj = {i: set() for i in range(n)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    seen, groups = set(), set()
    for start in range(n):
        if start in seen:
            continue
        stack, group = [start], set()
        while stack:
            x = stack.pop()
            if x not in group:
                group.add(x)
                stack.extend(adj[x] - group)
        seen |= group
        groups.add(frozenset(group))
    return groups


@pytest.mark.parametrize("seed", range(5))
def test_components_match_graph_search(seed):
    rng = np.random.default_rng(seed)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    uf = UnionFind(n)
    merges = uf.union_edges(a, b)
    comps = components(uf, np.arange(n))
    got = {frozenset(g.tolist()) for g in comps.groups()}
    want = _reference_groups(n, list(zip(a.tolist(), b.tolist())))
    assert got == want
    assert merges == n - len(want)  # each successful union removes exactly one set
    assert sum(uf.set_size(int(g[0])) for g in comps.groups()) == n


def test_union_reports_whether_it_merged():
    uf = UnionFind(4)
    assert uf.union(0, 1) and uf.union(2, 3) and uf.union(1, 3)
    assert not uf.union(0, 2)
    assert uf.find(0) == uf.find(3) and uf.set_size(2) == 4


def test_representative_is_lowest_rank_and_labels_follow_it():
    uf = UnionFind(6)
    uf.union_edges(np.array([0, 1, 3]), np.array([1, 2, 4]))  # {0,1,2} {3,4} {5}
    rank = np.array([5, 0, 3, 4, 1, 2])
    comps = components(uf, rank)
    assert comps.representative.tolist() == [1, 4, 5]  # groups numbered by representative rank
    assert comps.label.tolist() == [0, 0, 0, 1, 1, 2]
    assert comps.representative_of().tolist() == [1, 1, 1, 4, 4, 5]
    assert [g.tolist() for g in comps.groups(min_size=2)] == [[0, 1, 2], [3, 4]]


def test_representative_rank_most_pixels_then_smallest_uid():
    pixels = np.array([100, 400, 400, 50])
    uids = np.array(["d", "c", "b", "a"], dtype=object)
    assert representative_rank(pixels, uids).tolist() == [2, 1, 0, 3]


def test_components_independent_of_edge_order_and_direction():
    rng = np.random.default_rng(7)
    n = 60
    a, b = rng.integers(0, n, 40), rng.integers(0, n, 40)
    rank = rng.permutation(n)
    base = components(_uf(n, a, b), rank)
    perm = rng.permutation(len(a))
    other = components(_uf(n, b[perm], a[perm]), rank)
    assert np.array_equal(base.label, other.label)
    assert np.array_equal(base.representative, other.representative)


def _uf(n, a, b) -> UnionFind:
    uf = UnionFind(n)
    uf.union_edges(a, b)
    return uf


def test_bad_inputs_raise():
    uf = UnionFind(3)
    with pytest.raises(ValueError, match="0..2"):
        uf.union_edges(np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="ties"):
        components(uf, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="one entry per id"):
        components(uf, np.array([0, 1]))
