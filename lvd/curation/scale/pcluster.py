"""The cluster stage with no process holding the pool: candidates found by uid buckets, level 1
by `scale.dkmeans`, labels written by the actors, the stage's table merged by uid range.

Under a scratch folder (`RUN/cluster/_work`, dropped after):

1. map, Ray tasks: each ingest partition's accepted uids (caps applied), each vector part's
   (uid, store row), and each row-group chunk of the final duplicates and decontamination
   tables, written by uid bucket (`uidbuckets`, crc32).
2. keep, a task per bucket: its candidates (accepted, neither duplicate nor decontaminated)
   with the first store row of each (`VectorStore.rows` takes the first too). It writes those
   rows sorted (`kept/b{b}.parquet`) and returns the candidates per vector part and a sample of
   its uids. A candidate with no vector is refused, as `VectorStore.rows` refuses it.
3. The pool is the candidates in store-row order. `dkmeans` shards it over actors; an actor
   reads its store rows from the kept files (`CandidateRows.rows`), so the driver holds counts
   per vector part, not rows. The levels above level 1 cluster its centroids in the driver.
4. Each actor writes its rows (uid, leaf, score, cluster_ids) by uid range (`labels/r{r}/`,
   ranges cut at the buckets' uid samples); one task writes `clusters.parquet` a range at a time,
   sorted by uid, then the tree and the marker, as the one-task stage does.

The result equals the one-task stage with `engine="lloyd"` or `"ray"` bit for bit: its Lloyd runs
on the candidates in the same store-row order (`stages.select`).

Memory: a map task holds one ingest partition, vector part or table chunk; a bucket task one
bucket (`RECORDS_PER_TASK` rows, or `budget.order_records` under a budget); an actor its shard
(`dkmeans`) plus its rows' uids; the merging task one uid range. The driver holds the counts
per vector part, the uid samples and the tree (k centroids per level).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd import durable
from lvd.curation import rundir, runner, uidbuckets, uidranges
from lvd.curation.scale import budget as B
from lvd.curation.scale.poolorder import RECORDS_PER_TASK, tasks_for
from lvd.curation.scale.poolorder import wave as _wave
from lvd.curation.vectors import folder_parts

WORK = "_work"
CLUSTERS_SCHEMA = pa.schema(
    [("uid", pa.string()), ("leaf", pa.int64()), ("score", pa.float32()), ("cluster_ids", pa.list_(pa.int64()))]
)


@dataclass(frozen=True)
class CandidateRows:
    """The candidates' store rows, ascending, kept in the bucket tasks' files: candidate i is the
    i-th smallest row of all files."""

    files: tuple[str, ...]  # kept/b{b}.parquet: one `row` column, ascending
    store_offsets: tuple[int, ...]  # first store row of each vector part, and the store's end
    counts: tuple[int, ...]  # candidates per vector part

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    def __len__(self) -> int:
        return self.n

    def part_rows(self, part):
        """`shardindex.PartRows` of one vector part (`part.first_id` its first store row, `part.n`
        its rows) narrowed to its candidates: their rows within the part, ids = candidate numbers.
        Read by the shard that holds the part (`shardindex.Shard`), so no driver holds them."""
        j = self._part_at(part.first_id, part.n)
        first = int(np.sum(self.counts[:j]))
        rows = self.rows(first, self.counts[j]) - part.first_id
        return part._replace(n=len(rows), first_id=-1, rows=rows, ids=np.arange(first, first + len(rows)))

    def _part_at(self, offset: int, n: int) -> int:
        """The vector part starting at store row `offset` with `n` rows (after any empty parts
        that start there too): a search, since every shard asks for each of its parts."""
        offs = self.store_offsets
        j = int(np.searchsorted(offs[:-1], offset, side="right")) - 1
        if j < 0 or offs[j] != offset or offs[j + 1] - offset != n:
            raise KeyError(f"no vector part starts at store row {offset} with {n} rows (the folder changed)")
        return j

    def store_rows_at(self, positions: np.ndarray) -> np.ndarray:
        """int64: the store rows of candidates `positions` (any order), read a vector part at a time."""
        positions = np.asarray(positions, np.int64)
        cum = np.concatenate([[0], np.cumsum(self.counts)])
        part = np.searchsorted(cum, positions, side="right") - 1
        out = np.empty(len(positions), np.int64)
        for j in np.unique(part):
            sel = part == j
            out[sel] = self.rows(int(cum[j]), int(self.counts[j]))[positions[sel] - cum[j]]
        return out

    def rows(self, first: int, n: int) -> np.ndarray:
        """int64 [n]: the store rows of candidates first .. first + n, read from the store rows of
        the vector parts that hold them (the files' row groups outside are skipped)."""
        if n <= 0:
            return np.zeros(0, np.int64)
        cum = np.concatenate([[0], np.cumsum(self.counts)])
        p0 = int(np.searchsorted(cum, first, side="right") - 1)
        p1 = int(np.searchsorted(cum, first + n - 1, side="right") - 1)
        lo, hi = self.store_offsets[p0], self.store_offsets[p1 + 1]
        where = (pc.field("row") >= lo) & (pc.field("row") < hi)
        got = [pq.read_table(f, columns=["row"], filters=where)["row"].to_numpy() for f in self.files]
        rows = np.sort(np.concatenate(got)) if got else np.zeros(0, np.int64)
        start = first - int(cum[p0])
        return rows[start : start + n].astype(np.int64)


@dataclass(frozen=True)
class Candidates:
    rows: CandidateRows
    bounds: tuple[str, ...]  # uid range cuts: range r is [bounds[r - 1], bounds[r])


def find_candidates(run_dir: Path, vectors: Path, work: Path, opts: dict, *, buckets: int | None = None) -> Candidates:
    """Steps 1-2 of the module doc."""
    run, work = Path(run_dir), Path(work)
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run).values())
    budget = B.current()
    per_task = B.order_records(budget) if budget is not None else RECORDS_PER_TASK
    nb = buckets or tasks_for(records, per_task)
    parts = _vector_parts(vectors)
    offsets = np.concatenate([[0], np.cumsum([n for _, n in parts])]).astype(np.int64)
    jobs = [(str(run), str(work), "a", c, str(p), None, nb) for c, p in enumerate(rundir.ingest_manifests(run))]
    jobs += [(str(run), str(work), "v", i, uid_file, int(offsets[i]), nb) for i, (uid_file, _) in enumerate(parts)]
    for path in _gone_files(run):
        pf = pq.ParquetFile(path)
        groups, rows = [], 0
        for g in range(pf.num_row_groups):  # chunks of ~per_task rows: a task holds one
            groups.append(g)
            rows += pf.metadata.row_group(g).num_rows
            if rows >= per_task or g == pf.num_row_groups - 1:
                jobs.append((str(run), str(work), "g", len(jobs), str(path), tuple(groups), nb))
                groups, rows = [], 0
    _wave(_map, jobs, opts)
    got = _wave(_keep, [(str(work), b, offsets) for b in range(nb)], opts)
    counts = np.sum([g[0] for g in got], axis=0) if got else np.zeros(len(parts), np.int64)
    n = int(np.sum(counts))
    bounds = uidranges.ranges(sorted(u for g in got for u in g[1]), tasks_for(n, per_task))
    cuts = tuple(hi for _, hi in bounds[:-1])
    files = tuple(str(work / "kept" / f"b{b:06d}.parquet") for b in range(nb))
    return Candidates(CandidateRows(files, tuple(int(o) for o in offsets), tuple(int(c) for c in counts)), cuts)


def _vector_parts(vectors: Path) -> list[tuple[str, int]]:
    """(uids file, rows) of each complete vector part, in part order (the store's rows)."""
    npys, counts = folder_parts(vectors)
    return [(str(Path(p).with_suffix(".uids.parquet")), int(n)) for p, n in zip(npys, counts)]


def _gone_files(run: Path) -> list[Path]:
    """The final duplicates table (copy detection's, else hash dedup's) and the decontamination's."""
    return [p for p in (rundir.duplicates_file(run), rundir.decontaminated_file(run)) if p is not None]


def _map(run: str, work: str, kind: str, c: int, path: str, extra, nb: int) -> None:
    """Step 1: one input's uids (and store rows, for a vector part) by uid bucket."""
    if kind == "a":  # accepted records of an ingest partition
        t = rundir.apply_caps(Path(run), pq.read_table(path, columns=["uid", "status", "source"]))
        t = t.filter(pc.equal(t["status"], "accepted")).select(["uid"])
    elif kind == "v":  # a vector part: uid -> store row
        t = pq.read_table(path, columns=["uid"])
        t = t.append_column("row", pa.array(np.arange(len(t), dtype=np.int64) + extra))
    else:  # a chunk of row groups of a duplicates / decontamination table
        t = pq.ParquetFile(path).read_row_groups(list(extra), columns=["uid"])
    uidbuckets.write_sorted(t, Path(work) / "map" / kind / f"c{c:06d}.parquet", nb)


def _read_bucket(work: Path, kind: str, b: int, columns: list[str]) -> pa.Table:
    files = sorted((work / "map" / kind).glob("c*.parquet"))
    where = pc.field("bucket") == b
    tables = [pq.read_table(f, columns=columns, filters=where) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})


def _keep(work: str, b: int, offsets: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Step 2: bucket b's candidates and the first store row of each."""
    work = Path(work)
    acc = _read_bucket(work, "a", b, ["uid"])["uid"]
    gone = _read_bucket(work, "g", b, ["uid"])["uid"]
    cand = pc.unique(acc.combine_chunks())
    if len(gone):
        cand = cand.filter(pc.invert(pc.is_in(cand, value_set=pc.unique(gone.combine_chunks()))))
    vec = _read_bucket(work, "v", b, ["uid", "row"])
    if not len(vec):
        vec = pa.table({"uid": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
    first = vec.group_by("uid").aggregate([("row", "min")])
    got = pa.table({"uid": cand}).join(first, "uid", join_type="left outer")
    if got["row_min"].null_count:
        missing = got.filter(pc.is_null(got["row_min"]))["uid"][0].as_py()
        raise KeyError(f"uid {missing!r} is not in the vector store (a candidate without a vector: rerun embed)")
    rows = np.sort(got["row_min"].to_numpy().astype(np.int64))
    (work / "kept").mkdir(parents=True, exist_ok=True)
    durable.write_parquet(work / "kept" / f"b{b:06d}.parquet", pa.table({"row": rows}), row_group_size=16_384)
    counts = np.bincount(np.searchsorted(offsets, rows, side="right") - 1, minlength=len(offsets) - 1)
    uids = sorted(got["uid"].to_pylist())
    return counts[: len(offsets) - 1].astype(np.int64), uidranges.sample(uids)


def range_dir(work: Path, r: int) -> Path:
    return Path(work) / "labels" / f"r{r:06d}"


def write_ranges(work: str, index: int, uids: np.ndarray, leaf: np.ndarray, score: np.ndarray,
                 ups: list[np.ndarray], bounds: tuple[str, ...]) -> int:  # fmt: skip
    """Step 4 in an actor: its rows (uid, leaf, score, cluster_ids coarsest first) by uid range."""
    ids = [np.asarray(leaf, np.int64)]
    for up in ups:
        ids.append(np.asarray(up, np.int64)[ids[-1]])
    levels = len(ids)
    flat = np.stack(ids[::-1], axis=1).reshape(-1) if len(leaf) else np.zeros(0, np.int64)
    cluster_ids = pa.ListArray.from_arrays(pa.array(np.arange(0, len(leaf) * levels + 1, levels, dtype=np.int32)),
                                           pa.array(flat, pa.int64()))  # fmt: skip
    table = pa.table(
        {"uid": pa.array(uids.tolist(), pa.string()), "leaf": pa.array(ids[0]),
         "score": pa.array(np.asarray(score, np.float32)), "cluster_ids": cluster_ids},
        schema=CLUSTERS_SCHEMA,
    )  # fmt: skip
    r_of = np.searchsorted(np.array(bounds, dtype=object), uids, side="right") if bounds else np.zeros(len(uids), int)
    for r in np.unique(r_of):
        path = range_dir(Path(work), int(r)) / f"a{index:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_parquet(path, table.filter(pa.array(r_of == r)))
    return len(uids)


def merge(work: str, n_ranges: int, unit, stage_dir: str, cfg_hash: str, tree: pa.Table) -> dict:
    """Step 4's last task: `clusters.parquet` a uid range at a time, the tree, then the marker."""
    stage = Path(stage_dir)
    stem = runner.stem_of(unit)
    path = runner.output_path(stage, stem, "")
    rows = 0

    def write(f):
        nonlocal rows
        with pq.ParquetWriter(f, CLUSTERS_SCHEMA) as w:
            for r in range(n_ranges):
                files = sorted(range_dir(Path(work), r).glob("a*.parquet"))
                if not files:
                    continue
                t = pa.concat_tables([pq.read_table(p) for p in files]).sort_by([("uid", "ascending")])
                w.write_table(t.cast(CLUSTERS_SCHEMA), row_group_size=runner.GROUP_ROWS)
                rows += t.num_rows

    durable.write_atomic(path, write)
    tree_path = runner.output_path(stage, stem, "tree")
    durable.write_parquet(tree_path, tree, row_group_size=runner.GROUP_ROWS)
    return runner.write_marker(
        {"": (path, rows), "tree": (tree_path, tree.num_rows)}, unit, stage, cfg_hash, partitioned=True
    )


def clear(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
