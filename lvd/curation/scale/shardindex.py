"""A k-NN index spread over Ray actors, each holding one shard of a vector folder.

The pool's vectors stay where the embed stage wrote them (`lvd.curation.vectors`: float16
parts). A shard is a contiguous range of parts; its actor reads them (memory-mapped, in blocks)
into its own Faiss index, so no process ever holds the pool. Queries go out in blocks of
`query_block` to every shard; each answers its top k and the driver merges them by
(similarity, lower id), the order `knn_index.search` gives, so:
- exact mode (`IndexFlatIP` per shard) returns what one `knn_index` exact search over the
  same rows returns, bit for bit (`knn_index.search` re-scores and settles ties canonically);
- IVF mode (`IndexIVFFlat`, or IVF-PQ with `pq_m`) shares one coarse quantiser, trained in
  the driver on a seeded sample of the rows (`knn_index.training_rows`) read from the parts;
  each shard probes the same `nprobe` lists. Recall@k against exact search is measured in
  tests/curation/test_shardindex.py and benchmarks (notes/h14k.md).

Memory: a shard actor holds 4*D (+8 for IVF) bytes per row (IVF-PQ: pq_m + 8), so
`rows_per_shard` sizes it; the driver holds one query block (query_block * D * 4 bytes), the
shards' answers to it (n_shards * query_block * k * 12 bytes) and the k-means sample when
training. Pool-against-itself searches (`self_neighbours`, `similar_pairs`) walk the pool in
query blocks, so only their results grow with N. Built for a subset, the caller's uids go to
the shards in chunks of UID_CHUNK (each shard holds one chunk at a time, not the list); a
sequence with its own `uid_chunks()` (`poolorder.NodeUids`) gives loaders instead, which each shard
calls itself, so the caller never reads the list either. Built for a `pcluster.CandidateRows`
(candidates numbered in store-row order, their rows in files), each shard reads its own parts'
candidate rows, and nothing is sent.

Under a worker budget (`ShardConfig.budget`, else the job's `budget.current()`, set from
`--worker-memory`), `sized` derives the query block, the rows per shard (`budget.knn_shard_rows`:
the data share less the query block, quantiser and uid chunk) and the pool size above which the
index is sharded at all; the plan then cuts shards of at most that many rows (whole parts), so
the shard count follows from the pool and the budget, and every actor asks Ray for the memory
it will hold (`budget.knn_shard_memory`, at most the budget).

GPU: when the cluster has GPUs (`ray.cluster_resources()["GPU"]`) and this Faiss has GPU
support (the `lvd[gpu]` extra: faiss-gpu-cu12), each shard actor asks for one GPU and moves
its index there (`faiss.StandardGpuResources`); otherwise everything runs on CPU. On GPU the
exact mode equals the CPU answer up to float rounding (only CPU flat indexes are re-scored).
Without a running Ray (a notebook, a unit test of a caller) the shards live in this process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray

from lvd.curation import knn_index
from lvd.curation.knn_index import IndexConfig, Neighbours, Pairs, as_unit_float32
from lvd.curation.scale import budget as B
from lvd.curation.vectors import open_vectors, part_paths

MODES = ("auto", "exact", "ivf")
_PART = re.compile(r"^part-(\d{6})\.uids\.parquet$")
_READ_ROWS = 65_536  # rows converted to float32 at once when a shard loads its parts
UID_CHUNK = 65_536  # uids of a subset sent to the shards per object (a shard holds one chunk at a time)
DEFAULT_K = 64  # neighbours the index is sized for when the caller does not say (copy detection's k)
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How to shard; `index` says exact vs IVF (its `exact_below`) and the IVF's lists."""

    index: IndexConfig = field(default_factory=IndexConfig)
    mode: str = "auto"  # "exact": flat per shard; "ivf"; "auto": exact below index.exact_below rows
    sharded_above: int = 200_000  # callers keep one in-process index for pools smaller than this
    rows_per_shard: int = 5_000_000  # a shard takes whole parts up to about this many rows
    n_shards: int | None = None  # None: from rows_per_shard (never more than the parts)
    query_block: int = 16_384  # queries sent to the shards at once
    pq_m: int | None = None  # IVF-PQ with pq_m bytes per vector (D % pq_m == 0); None: IVF-Flat
    num_cpus: float = 1.0  # per shard actor
    use_gpu: bool | None = None  # None: GPU actors when the cluster has GPUs and Faiss supports them
    # per-worker memory budget (`sized`): None takes the job's (`budget.current()`, --worker-memory)
    budget: B.WorkerBudget | None = None

    def __post_init__(self):
        if isinstance(self.index, dict):  # from flow parameters (JSON)
            object.__setattr__(self, "index", IndexConfig(**self.index))
        if isinstance(self.budget, dict):
            object.__setattr__(self, "budget", B.WorkerBudget(**self.budget))
        elif isinstance(self.budget, (int, str)):
            object.__setattr__(self, "budget", B.WorkerBudget.parse(self.budget))
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {MODES}")
        for name in ("rows_per_shard", "query_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use a positive number")
        if self.n_shards is not None and self.n_shards < 1:
            raise ValueError(f"n_shards={self.n_shards}: use None (from rows_per_shard) or at least 1")
        if self.sharded_above < 0:
            raise ValueError(f"sharded_above={self.sharded_above}: use 0 (always sharded) or a pool size")
        if self.pq_m is not None and self.pq_m < 1:
            raise ValueError(f"pq_m={self.pq_m}: use None (IVF-Flat) or bytes per code dividing D")

    def exact_for(self, n: int) -> bool:
        return self.mode == "exact" or (self.mode == "auto" and n < self.index.exact_below)

    def kind_for(self, n: int) -> str:
        """The index kind (`budget.INDEX_KINDS`) a pool of n rows gets."""
        return "flat" if self.exact_for(n) else ("ivf" if self.pq_m is None else "ivfpq")

    def shard_memory(self, rows: int, n: int, dim: int, k: int, *, subset: bool) -> int | None:
        """Ray `memory=` of a shard actor holding `rows` of a pool of n (None without a budget)."""
        if self.budget is None:
            return None
        return B.knn_shard_memory(self.budget, rows, dim, k, **_fixed(self, n, dim, subset))


def _fixed(cfg: ShardConfig, n: int, dim: int, subset: bool) -> dict:
    """`budget.knn_shard_*` keyword arguments: what a shard holds besides its rows."""
    kind = cfg.kind_for(n)
    return dict(
        query_rows=cfg.query_block,
        index=kind,
        nlist=0 if kind == "flat" else cfg.index.lists_for(n),
        pq_bytes=cfg.pq_m or 0,
        n_uids=min(n, UID_CHUNK) if subset else 0,
    )


def sized(cfg: ShardConfig, n: int, dim: int, k: int = DEFAULT_K, *, subset: bool = False) -> ShardConfig:
    """`cfg` under its budget (`cfg.budget`, else the job's `budget.current()`): query blocks of at
    most `budget.query_block_rows`, shards of at most `budget.knn_shard_rows` rows, and sharded
    at all (`sharded_above`) when the pool has more rows than one worker may hold. No budget:
    `cfg` itself. Sizes never change results (shards merge to one index's answer)."""
    b = cfg.budget or B.current()
    if b is None or not dim:
        return cfg
    cfg = dataclasses.replace(cfg, budget=b, query_block=min(cfg.query_block, B.query_block_rows(b, dim, k)))
    cfg = dataclasses.replace(cfg, index=_train_within(cfg, n, B.ivf_train_rows(b, dim)))
    rows = B.knn_shard_rows(b, dim, k, **_fixed(cfg, n, dim, subset))
    return dataclasses.replace(
        cfg, rows_per_shard=min(cfg.rows_per_shard, rows), sharded_above=min(cfg.sharded_above, rows + 1)
    )


def _train_within(cfg: ShardConfig, n: int, most: int) -> IndexConfig:
    """The IVF's lists and training points per list such that its training sample (read into the
    driver) has at most `most` rows: fewer points per list first (down to Faiss's 39), then fewer
    lists. An exact index, or a sample that fits, keeps `cfg.index`."""
    idx = cfg.index
    if cfg.exact_for(n):
        return idx
    nlist = idx.lists_for(n)
    if nlist * idx.train_points_per_list <= most:
        return idx
    per = max(B.IVF_MIN_POINTS_PER_LIST, min(idx.train_points_per_list, most // nlist))
    return dataclasses.replace(idx, nlist=max(1, min(nlist, most // per)), train_points_per_list=per)


# ---------------------------------------------------------------- the folder's parts


class PartRows(NamedTuple):
    """Rows of one part that an index holds, and their ids."""

    part: int  # part index (file name)
    n: int  # rows indexed
    first_id: int  # with rows None: every row r of the part, id first_id + r
    rows: np.ndarray | None = None  # int64 chosen rows within the part
    ids: np.ndarray | None = None  # int64 their ids

    def id_array(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + self.n) if self.ids is None else self.ids

    def row_array(self) -> np.ndarray:
        return np.arange(self.n) if self.rows is None else self.rows


def list_parts(folder: str | Path) -> list[tuple[int, int]]:
    """(part index, rows) of every complete part (its uids file exists), in part order;
    reads only the .npy headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no vector folder (run the embed stage first)")
    out = []
    for name in sorted(os.listdir(folder)):
        if m := _PART.match(name):
            npy = part_paths(folder, int(m.group(1)))[0]
            out.append((int(m.group(1)), len(np.load(npy, mmap_mode="r", allow_pickle=False))))
    return out


def _choose(parts: list[tuple[int, int]]) -> list[PartRows]:
    """Every row of every part, numbered in store order (no per-row arrays)."""
    starts = np.concatenate([[0], np.cumsum([n for _, n in parts])]).astype(np.int64)
    return [PartRows(p, n, int(s)) for (p, n), s in zip(parts, starts)]


def _part_uids(folder: Path, part: int) -> np.ndarray:
    """bytes [n]: one part's uids, row order (one part in memory at a time)."""
    uids = pq.read_table(part_paths(folder, part)[1], columns=["uid"])["uid"].to_pylist()
    return np.array([u.encode() for u in uids], dtype=bytes) if uids else np.zeros(0, "S1")


def _matches(mine: np.ndarray, want_sorted: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `mine`, positions in the wanted list) of every wanted uid found in `mine`,
    by ascending position; a uid wanted twice matches twice (as `VectorStore.rows`)."""
    width = max(mine.dtype.itemsize, want_sorted.dtype.itemsize)
    mine, want_sorted = mine.astype(f"S{width}"), want_sorted.astype(f"S{width}")
    lo = np.searchsorted(want_sorted, mine, side="left")
    hits = np.searchsorted(want_sorted, mine, side="right") - lo
    rows = np.repeat(np.arange(len(mine), dtype=np.int64), hits)
    first = np.repeat(lo - (np.cumsum(hits) - hits), hits)
    pos = order[first + np.arange(len(rows))].astype(np.int64)
    o = np.argsort(pos, kind="stable")
    return rows[o], pos[o]


def _sorted_wanted(uids) -> tuple[np.ndarray, np.ndarray]:
    want = np.array([str(u).encode() for u in uids], dtype=bytes) if len(uids) else np.zeros(0, "S1")
    order = np.argsort(want, kind="stable")
    return want[order], order


def _uid_chunks(uids) -> list[tuple[int, object]]:
    """(offset, chunk) of `uids` by UID_CHUNK; with Ray each chunk is an object-store ref, so a
    shard fetches one at a time and never holds the caller's whole list. A sequence with its own
    `uid_chunks()` (`poolorder.NodeUids`: loaders of position ranges) gives those: the shard loads
    each one itself, and the caller never reads the list."""
    if hasattr(uids, "uid_chunks"):
        return uids.uid_chunks()
    if hasattr(uids, "part_rows"):  # `pcluster.CandidateRows`: files, read by each shard itself
        return uids
    out = []
    for s in range(0, len(uids), UID_CHUNK):
        chunk = uids[s : s + UID_CHUNK]
        out.append((s, ray.put(chunk) if ray.is_initialized() else chunk))
    return out


def _load(chunk) -> Sequence[str]:
    if isinstance(chunk, ray.ObjectRef):
        return ray.get(chunk)
    return chunk() if callable(chunk) else chunk


def _own_rows(folder: Path, parts: list[PartRows], chunks: list[tuple[int, object]]) -> list[PartRows]:
    """A shard's share of the caller's uids (`_uid_chunks`): per part of its own, the rows it
    holds of them, numbered by position in the list. Run by the shard, so only it reads its
    parts' uids (the driver never maps the pool's uids); one chunk of the list at a time."""
    mine = [_part_uids(folder, p.part) for p in parts]
    got: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in parts]
    for offset, chunk in chunks:
        want, order = _sorted_wanted(_load(chunk))
        for j, m in enumerate(mine):
            rows, pos = _matches(m, want, order)
            got[j].append((rows, pos + offset))
    out = []
    for p, g in zip(parts, got):
        rows = np.concatenate([r for r, _ in g]) if g else np.zeros(0, np.int64)
        pos = np.concatenate([q for _, q in g]) if g else np.zeros(0, np.int64)
        out.append(PartRows(p.part, len(pos), -1, rows, pos))  # chunks in order: positions ascend
    return out


def _sample_vectors(folder: Path, parts: list[tuple[int, int]], d: int, uids) -> np.ndarray:
    """float32 [len(uids), D]: the vectors of a few uids (the IVF training sample), in that
    order, read part by part (the driver holds one part's uids at a time)."""
    want, order = _sorted_wanted(uids)
    x, found = np.empty((len(want), d), np.float32), np.zeros(len(want), bool)
    for p, _ in parts:
        rows, pos = _matches(_part_uids(folder, p), want, order)
        if len(pos):
            x[pos] = np.load(part_paths(folder, p)[0], mmap_mode="r", allow_pickle=False)[rows]
            found[pos] = True
    if not found.all():
        raise KeyError(f"uid {list(uids)[int(np.argmin(found))]!r} is not in the vector store")
    return x


def _plan(chosen: list[PartRows], cfg: ShardConfig) -> list[list[PartRows]]:
    """Contiguous runs of parts with about equal indexed rows, one per shard (no empty one).
    Under a budget every run keeps within `rows_per_shard`: the equal cut with the fewest
    shards that does (a few more tried), else runs packed greedily in order. Parts are whole:
    a part larger than that gets a shard of its own, over it, and a warning."""
    counts = np.array([p.n for p in chosen], np.int64)
    total, nonempty = int(counts.sum()), int((counts > 0).sum())
    if not total:
        return []
    n = cfg.n_shards or -(-total // cfg.rows_per_shard)
    if cfg.budget is None:
        return _cut(chosen, counts, max(1, min(n, nonempty)))
    limit = cfg.rows_per_shard
    n = max(1, min(max(n, -(-total // limit)), nonempty))
    for m in range(n, min(nonempty, 2 * n + 8) + 1):
        groups = _cut(chosen, counts, m)
        if max(_rows(g) for g in groups) <= limit:
            return groups
    groups = _greedy(chosen, limit)
    if (big := max(_rows(g) for g in groups)) > limit:
        log.warning("a vector part of %d rows is more than a shard may hold under the budget (%d rows)", big, limit)
    return groups


def _greedy(chosen: list[PartRows], limit: int) -> list[list[PartRows]]:
    """Runs of parts in order, each as long as it stays within `limit` rows."""
    groups: list[list[PartRows]] = []
    for p in (p for p in chosen if p.n):
        if groups and _rows(groups[-1]) + p.n <= limit:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _rows(group: list[PartRows]) -> int:
    return sum(p.n for p in group)


def _cut(chosen: list[PartRows], counts: np.ndarray, n: int) -> list[list[PartRows]]:
    """n contiguous runs of parts with about equal rows (empty runs and parts dropped)."""
    total = int(counts.sum())
    cut = np.searchsorted(np.cumsum(counts), [total * j / n for j in range(1, n)], side="left") + 1
    groups = [[chosen[i] for i in g if chosen[i].n] for g in np.split(np.arange(len(chosen)), cut)]
    return [g for g in groups if g]


class _Layout:
    """Where the vectors of some parts' chosen rows live, walked by position in id order."""

    def __init__(self, folder: Path, chosen: list[PartRows], d: int):
        self.folder, self.chosen, self.d = folder, [p for p in chosen if p.n], d
        self.full = all(p.rows is None for p in self.chosen)
        if self.full:  # O(parts): ids are each part's range, parts in id order
            self.cum = np.concatenate([[0], np.cumsum([p.n for p in self.chosen])]).astype(np.int64)
        else:
            ids = np.concatenate([p.id_array() for p in self.chosen])
            order = np.argsort(ids, kind="stable")
            self.ids = ids[order]
            self.j = np.concatenate([np.full(p.n, j) for j, p in enumerate(self.chosen)])[order]
            self.rows = np.concatenate([p.row_array() for p in self.chosen])[order]

    def __len__(self) -> int:
        return int(self.cum[-1]) if self.full else len(self.ids)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 [n, D]) of the rows at `positions` (0-based, in id order)."""
        if self.full:
            j = np.searchsorted(self.cum, positions, side="right") - 1
            rows = positions - self.cum[j]
            ids = np.array([self.chosen[a].first_id for a in range(len(self.chosen))], np.int64)[j] + rows
        else:
            j, rows, ids = self.j[positions], self.rows[positions], self.ids[positions]
        x = np.empty((len(positions), self.d), np.float32)
        for a in np.unique(j):
            sel = j == a
            vecs = np.load(part_paths(self.folder, self.chosen[a].part)[0], mmap_mode="r", allow_pickle=False)
            x[sel] = vecs[rows[sel]]
        return ids, x

    def blocks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(self), rows):
            yield self.take(np.arange(s, min(s + rows, len(self))))


# ---------------------------------------------------------------- one shard


class Shard:
    """One shard's Faiss index over its parts' chosen rows; answers top-k with global ids."""

    def __init__(self, folder: str, parts: list[PartRows], template: bytes | None, d: int, gpu: bool, uids=None):
        if hasattr(uids, "part_rows"):  # `pcluster.CandidateRows`: this shard reads its parts' candidates
            parts = [uids.part_rows(p) for p in parts]
        elif uids is not None:  # built for a subset (`_uid_chunks`): this shard finds its own parts' rows of it
            parts = _own_rows(Path(folder), parts, uids)
        self._layout = layout = _Layout(Path(folder), parts, d)
        index = faiss.IndexFlatIP(d) if template is None else faiss.deserialize_index(np.frombuffer(template, "u1"))
        if gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        # rows added in ascending id order, so Faiss's local ids sort like the global ones
        ids = []
        for block_ids, x in layout.blocks(_READ_ROWS):
            index.add(x)
            ids.append(block_ids)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.index = index

    def set_nprobe(self, nprobe: int) -> None:
        faiss.extract_index_ivf(self.index).nprobe = nprobe

    def size(self) -> int:
        return int(self.index.ntotal)

    def ids_held(self) -> np.ndarray:
        """The global ids of this shard's rows (asked for only to name a missing uid)."""
        return self.ids

    def rows_between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 [n, D]) of this shard's rows with lo <= id < hi, in id order."""
        a, b = np.searchsorted(self.ids, [lo, hi])
        if b <= a:
            return np.zeros(0, np.int64), np.zeros((0, self._layout.d), np.float32)
        return self._layout.take(np.arange(a, b))

    def node_id(self) -> str | None:
        """The Ray node holding this shard (None in-process): where the shards went."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def assigned_memory(self) -> int:
        """Ray's `memory` resource this shard's actor holds (0 in-process or when none was asked)."""
        if not ray.is_initialized():
            return 0
        return int(ray.get_runtime_context().get_assigned_resources().get("memory", 0))

    def search(self, q_QD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, global ids) [Q, k], best first, ties by lower id; -inf / -1 padded."""
        if not self.index.ntotal or not len(q_QD):
            return np.full((len(q_QD), k), -np.inf, np.float32), np.full((len(q_QD), k), -1, np.int64)
        nb = knn_index.search(self.index, q_QD, k, query_batch=len(q_QD))
        return nb.sims_QK, np.where(nb.ids_QK >= 0, self.ids[np.maximum(nb.ids_QK, 0)], -1)


def merge(answers: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> Neighbours:
    """The k best of the shards' answers per query: similarity descending, ties by lower id."""
    sims = np.concatenate([a[0] for a in answers], axis=1)
    ids = np.concatenate([a[1] for a in answers], axis=1)
    ids = np.where(np.isfinite(sims), ids, np.iinfo(np.int64).max)  # padding sorts last
    order = np.lexsort((ids, -sims))[:, :k]
    sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
    ids[~np.isfinite(sims)] = -1
    return Neighbours(sims.astype(np.float32), ids.astype(np.int64))


# ---------------------------------------------------------------- the driver


class ShardedIndex:
    """Shards of a vector folder on Ray actors (or in this process without Ray).

    Ids are store rows (every part's rows, in part order) or, when built for `uids`, positions
    in `uids`. Use as a context manager, or `close()`, to free the actors.

    The driver's memory does not grow with the pool: it keeps O(parts) (the full layout) and
    one query block. Built for `uids`, the list goes to the shards in chunks (one object-store
    copy each, or a loader each: `_uid_chunks`), each shard maps its own parts' uids, and query
    blocks come back from the shards.
    `memory` (per shard, under a budget) is each actor's Ray `memory=` request.
    """

    def __init__(
        self,
        layout: _Layout,
        plan: list[list[PartRows]],
        template: bytes | None,
        cfg: ShardConfig,
        uids=None,
        memory: list[int | None] | None = None,
    ):
        self.cfg, self.d, self._folder = cfg, layout.d, layout.folder
        self._layout = layout if uids is None else None  # O(parts); a subset's rows live in the shards
        self.exact = template is None
        self.gpu = _gpu_wanted(cfg.use_gpu)
        self.memory = list(memory) if memory is not None else [None] * len(plan)
        # refs to the uid chunks (N / UID_CHUNK of them) stay alive while a restarted shard may need them
        self._uid_chunks = None if uids is None else _uid_chunks(uids)
        args = [(str(layout.folder), g, template, layout.d, self.gpu, self._uid_chunks) for g in plan]
        if ray.is_initialized():
            cpus = B.resident_cpus(cfg.num_cpus, self.memory)  # every shard resident at once
            opts = dict(num_cpus=cpus, num_gpus=1 if self.gpu else 0, max_restarts=2, max_task_retries=2)
            actor = ray.remote(Shard)
            self._shards = [
                actor.options(**opts, **({"memory": m} if m else {})).remote(*a) for a, m in zip(args, self.memory)
            ]
        else:
            self._shards = [Shard(*a) for a in args]
        self.shard_rows = [sum(p.n for p in g) for g in plan] if uids is None else self._call("size")
        if not self.exact:
            self._call("set_nprobe", cfg.index.nprobe)

    def __len__(self) -> int:
        return sum(self.shard_rows)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def node_ids(self) -> list[str | None]:
        return self._call("node_id")

    def _call(self, method: str, *args) -> list:
        if not self._shards or not ray.is_initialized() or isinstance(self._shards[0], Shard):
            return [getattr(s, method)(*args) for s in self._shards]
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        return ray.get([getattr(s, method).remote(*refs) for s in self._shards])

    def neighbours(self, queries_QD: np.ndarray, k: int) -> Neighbours:
        """The k most similar indexed rows of every query (L2-normalised), best first."""
        if k < 1:
            raise ValueError(f"k={k}: ask for at least one neighbour")
        q = as_unit_float32(queries_QD, "queries")
        if len(q) and q.shape[1] != self.d:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.d}")
        out = [self._block(q[s : s + self.cfg.query_block], k) for s in range(0, len(q), self.cfg.query_block)]
        if not out:
            return Neighbours(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        return Neighbours(np.concatenate([o.sims_QK for o in out]), np.concatenate([o.ids_QK for o in out]))

    def _block(self, q: np.ndarray, k: int) -> Neighbours:
        if not self._shards:
            return Neighbours(np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        return merge(self._call("search", q, k), k)

    def query_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of the indexed rows, `query_block` at a time, in id order
        (a subset's blocks are read by the shards holding their rows)."""
        if self._layout is not None:
            return self._layout.blocks(self.cfg.query_block)
        return self._shard_blocks()

    def _shard_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, len(self), self.cfg.query_block):
            got = self._call("rows_between", lo, min(lo + self.cfg.query_block, len(self)))
            ids = np.concatenate([g[0] for g in got])
            order = np.argsort(ids, kind="stable")
            yield ids[order], np.concatenate([g[1] for g in got])[order]

    def self_neighbours(self, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [B], neighbour ids [B, k]) per query block: each indexed row's k nearest other
        rows (itself dropped wherever it ranks), -1 padded; what copydetect.knn_lists gives."""
        for ids, x in self.query_blocks():
            nb = self.neighbours(x, min(k + 1, len(self)))
            yield ids, drop_self(nb.ids_QK, ids, k)

    def knn_lists(self, k: int) -> np.ndarray:
        """int64 [N, k]: `self_neighbours` for every indexed row, in id order (N * k * 8 bytes)."""
        out = [nb for _, nb in self.self_neighbours(k)]
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)

    def similar_pairs(self, *, k: int, threshold: float) -> Pairs:
        """`knn_index.similar_pairs` over the indexed rows: pairs (a < b) among each other's k
        nearest with cosine > threshold, each once with its larger similarity; built per query
        block, so the driver holds one block plus the pairs kept."""
        a, b, s = [], [], []
        for ids, x in self.query_blocks():
            nb = self.neighbours(x, k + 1)
            q = np.broadcast_to(ids[:, None], nb.ids_QK.shape)
            keep = (nb.ids_QK >= 0) & (nb.ids_QK != q) & (nb.sims_QK > threshold)
            a.append(q[keep]), b.append(nb.ids_QK[keep]), s.append(nb.sims_QK[keep])
        return knn_index.unique_pairs(*(np.concatenate(v) if v else np.zeros(0) for v in (a, b, s)))

    def close(self) -> None:
        if self._shards and not isinstance(self._shards[0], Shard):
            for s in self._shards:
                ray.kill(s)
        self._shards = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_self(ids_QK: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k]: each row's neighbours without its own id, order kept, -1 padded."""
    ids = np.where(ids_QK == self_ids[:, None], -1, ids_QK)
    ids = np.take_along_axis(ids, np.argsort(ids < 0, axis=1, kind="stable"), axis=1)[:, :k]
    return np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1) if ids.shape[1] < k else ids


def build(folder: str | Path, uids=None, cfg: ShardConfig | None = None, *, k: int = DEFAULT_K) -> ShardedIndex:
    """A sharded index over a vector folder (`vectors.open_vectors` layout): all rows (ids =
    store rows), those of `uids` (ids = positions in `uids`), or the candidates of a
    `pcluster.CandidateRows` (ids = candidate numbers, in store-row order). Under a budget (`sized`, for
    searches of up to `k` neighbours) the shards and their memory requests follow from it."""
    folder = Path(folder)
    parts = list_parts(folder)
    chosen = _choose(parts)  # a subset's shards: planned by store rows, each finds its own rows
    layout = _Layout(folder, chosen, _dim(folder, parts))
    n = len(layout) if uids is None else len(uids)
    cfg = sized(cfg or ShardConfig(), n, layout.d, k, subset=uids is not None)

    def sample(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if uids is None:
            return layout.take(pos)
        if hasattr(uids, "store_rows_at"):  # candidates numbered in store-row order (`pcluster`)
            return pos, layout.take(uids.store_rows_at(pos))[1]
        at = uids.take(pos) if hasattr(uids, "take") else [uids[int(i)] for i in pos]
        return pos, _sample_vectors(folder, parts, layout.d, at)

    template = None if cfg.exact_for(n) or n == 0 else _trained_template(n, layout.d, sample, cfg)
    plan = _plan(chosen, cfg)
    memory = [cfg.shard_memory(_rows(g), n, layout.d, k, subset=uids is not None) for g in plan]
    index = ShardedIndex(layout, plan, template, cfg, uids, memory)
    if len(index) != n:
        _missing(index, n, uids)
    return index


def _missing(index: ShardedIndex, n: int, uids) -> None:
    """Close the index and name a uid that no shard holds (or say one is stored twice)."""
    held = np.zeros(n, bool)
    for ids in index._call("ids_held"):
        held[ids] = True
    index.close()
    if held.all():
        raise KeyError(f"{n} uids asked for, some stored in more than one part: one part per uid")
    if hasattr(uids, "part_rows"):
        raise KeyError(f"candidate {int(np.argmin(held))} of {n} is in no shard (the vector folder changed)")
    raise KeyError(f"uid {uids[int(np.argmin(held))]!r} is not in the vector store")


def _dim(folder: Path, parts: list[tuple[int, int]]) -> int:
    dims = {np.load(part_paths(folder, p)[0], mmap_mode="r").shape[1] for p, n in parts if n}
    if len(dims) > 1:
        raise ValueError(f"{folder}: parts have different dimensions {sorted(dims)}: one folder per backbone")
    return dims.pop() if dims else 0


def _trained_template(n: int, d: int, take, cfg: ShardConfig) -> bytes:
    """An empty IVF, its quantiser trained on a seeded sample of the indexed rows, read from the
    parts (the rows `knn_index` would train on for the same pool in id order); `take(ids)`
    gives (ids, float32 vectors)."""
    if cfg.pq_m is not None and d % cfg.pq_m:
        raise ValueError(f"pq_m={cfg.pq_m} must divide the dimension {d}")
    index = knn_index.new_ivf(d, cfg.index.lists_for(n), cfg.index, pq_m=cfg.pq_m)
    _, sample = take(knn_index.training_rows(n, index.nlist, cfg.index))
    index.train(as_unit_float32(sample, "training sample"))
    return faiss.serialize_index(index).tobytes()


def _gpu_wanted(use_gpu: bool | None) -> bool:
    """GPU shard actors: asked for (or auto) and both the cluster and Faiss have GPUs."""
    has_faiss = hasattr(faiss, "StandardGpuResources")
    cluster = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else knn_index.gpu_wanted(None)
    if use_gpu and not (has_faiss and cluster):
        raise RuntimeError("use_gpu=True but the cluster has no GPU or Faiss no GPU support: pip install 'lvd[gpu]'")
    return bool(has_faiss and cluster) and use_gpu is not False


def knn_lists(
    folder: str | Path,
    uids,
    k: int,
    queries_QD: np.ndarray | None = None,
    *,
    exclude_self: bool = True,
    cfg: ShardConfig | None = None,
) -> np.ndarray:
    """int64 [Q, k]: copydetect.knn_lists over the vectors of `uids` in `folder`, ids = positions
    in `uids`. Below `cfg.sharded_above` rows one in-process exact/IVF index (as before);
    above, a sharded index, the pool walked in query blocks. Under a worker budget (`cfg.budget`,
    else the job's, `sized`) a pool larger than one worker may hold is sharded whatever
    `sharded_above` says, in shards sized by the budget."""
    cfg = cfg or ShardConfig()
    if cfg.budget is not None or B.current() is not None:
        cfg = sized(cfg, len(uids), _dim(Path(folder), list_parts(folder)), k, subset=True)
    if len(uids) < cfg.sharded_above:
        return _local_knn_lists(open_vectors(folder).get(uids), k, queries_QD, exclude_self, cfg.index)
    with build(folder, uids, cfg, k=k) as index:
        if queries_QD is None and exclude_self:
            return index.knn_lists(k)
        if queries_QD is None:
            queries_QD = np.concatenate([x for _, x in index.query_blocks()])
        ids = index.neighbours(queries_QD, k).ids_QK
        return ids


def _local_knn_lists(vecs_ND, k, queries_QD, exclude_self: bool, icfg: IndexConfig) -> np.ndarray:
    """copydetect.knn_lists, written out here (copydetect imports this package's callers)."""
    q = vecs_ND if queries_QD is None else queries_QD
    if not len(q) or not len(vecs_ND):
        return np.full((len(q), k), -1, np.int64)
    index = knn_index.build_index(vecs_ND, icfg)
    ids = knn_index.search(index, np.asarray(q), min(k + 1, len(vecs_ND))).ids_QK
    if exclude_self and queries_QD is None:
        return drop_self(ids, np.arange(len(ids)), k)
    ids = ids[:, :k]
    return np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1) if ids.shape[1] < k else ids
