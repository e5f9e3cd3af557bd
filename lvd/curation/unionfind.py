"""Union-find over dense integer ids, and connected components with a chosen representative.

`UnionFind` keeps its parent/size arrays as Python lists while edges are being merged: a
per-edge Python loop over lists is several times faster than indexing numpy arrays element by
element, and the edge lists dedup produces are small next to the number of images. Results come
back as numpy arrays.

Representatives are chosen by a caller-supplied integer `rank` (lower wins), so that the choice
depends only on the members of a group, never on insertion order or on which root union-find
happened to keep. `representative_rank` builds the rank curation uses: most pixels, then the
smallest uid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class UnionFind:
    """Disjoint sets over ids 0..n-1: path halving + union by size (near-constant amortised)."""

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"n={n}: the number of ids must be >= 0")
        self._parent = list(range(n))
        self._size = [1] * n

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, x: int) -> int:
        parent = self._parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: every other node skips a level
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> bool:
        """Merge the sets of x and y; True when they were separate."""
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return False
        if self._size[rx] < self._size[ry]:
            rx, ry = ry, rx
        self._parent[ry] = rx
        self._size[rx] += self._size[ry]
        return True

    def union_edges(self, a: np.ndarray, b: np.ndarray) -> int:
        """Union every pair (a[i], b[i]); returns how many merges happened."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"edge endpoints must be 1-D arrays of one length, got {a.shape} and {b.shape}")
        n = len(self._parent)
        if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
            raise ValueError(f"edge endpoints must lie in 0..{n - 1}")
        return sum(self.union(x, y) for x, y in zip(a.tolist(), b.tolist()))

    def roots(self) -> np.ndarray:
        """Root id of every element, int64 [n]."""
        return np.fromiter((self.find(x) for x in range(len(self._parent))), np.int64, len(self._parent))

    def set_size(self, x: int) -> int:
        return self._size[self.find(x)]


@dataclass(frozen=True)
class Components:
    """Groups of ids. `label[i]` is the group of id i (0..G-1, numbered by the rank of each
    group's representative, so numbering is order independent); `representative[g]` is the id
    of group g's representative (the member with the lowest rank)."""

    label: np.ndarray  # int64 [n]
    representative: np.ndarray  # int64 [G]

    @property
    def num_groups(self) -> int:
        return len(self.representative)

    def groups(self, min_size: int = 1) -> list[np.ndarray]:
        """Member ids of each group (ascending rank of representative), groups of >= min_size."""
        order = np.argsort(self.label, kind="stable")
        bounds = np.flatnonzero(np.diff(self.label[order])) + 1
        return [g for g in np.split(order, bounds) if len(g) >= min_size] if len(order) else []

    def representative_of(self) -> np.ndarray:
        """The representative id of every id, int64 [n]."""
        return self.representative[self.label]


def components(uf: UnionFind, rank: np.ndarray) -> Components:
    """Connected components of `uf`; each group's representative is its lowest-`rank` member.

    `rank` must be a permutation-like int array [n] without ties (ties would make the choice
    depend on ids); `representative_rank` gives one.
    """
    rank = np.asarray(rank, dtype=np.int64)
    if rank.shape != (len(uf),):
        raise ValueError(f"rank has shape {rank.shape}; it needs one entry per id ({len(uf)},)")
    if len(np.unique(rank)) != len(rank):
        raise ValueError("rank has ties; break them (e.g. by uid) so representatives are deterministic")
    roots = uf.roots()
    # members sorted by (root, rank): the first member of each root's run is its representative
    order = np.lexsort((rank, roots))
    first = np.ones(len(order), dtype=bool)
    first[1:] = roots[order][1:] != roots[order][:-1]
    reps = order[first]
    reps = reps[np.argsort(rank[reps], kind="stable")]  # number groups by representative rank
    group_of_root = np.empty(len(uf), dtype=np.int64)
    group_of_root[roots[reps]] = np.arange(len(reps))
    return Components(label=group_of_root[roots], representative=reps.astype(np.int64))


def representative_rank(pixels: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """Rank of each id for representative choice: most pixels first, then smallest uid.

    Returns int64 [n] with 0 = most preferred. uids must be unique.
    """
    pixels = np.asarray(pixels, dtype=np.int64)
    uids = np.asarray(uids)
    if pixels.shape != uids.shape or pixels.ndim != 1:
        raise ValueError(f"pixels {pixels.shape} and uids {uids.shape} must be 1-D of one length")
    order = np.lexsort((uids, -pixels))  # last key is primary
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank
