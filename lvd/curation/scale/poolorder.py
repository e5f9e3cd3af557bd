"""The pool's order with no process holding it: the positions of the unique accepted images, and
uid -> position joins, by waves of Ray tasks over bucketed Parquet files.

The order is `rundir.unique_accepted`'s: each accepted uid's first input by (source, ingest
partition, row), the images sorted by that key. Under a scratch folder:

1. map, a task per ingest partition (caps applied): its accepted records to uid buckets
   (`uidbuckets`, crc32), and a sample of their keys weighted by the records each stands for.
2. first, a task per uid bucket: each uid's first record by key (every record of a uid is in its
   bucket); the records go to order ranges cut at the sample's weighted quantiles (Arrow's own
   order of the keys, so a key equal to a bound opens its range) -> counts per range.
3. number, a task per order range: its records sorted by key get positions offset + rank (the
   offsets are the driver's prefix sums of the counts); it writes the node rows (pos, uid,
   pixels, log aspect) by position range (`nodes/r{r}/j{j}`), its uid -> position rows by uid
   bucket (`uidpos/j{j}`), and returns its `m` smallest calibration keys
   (`copydetect.calibration_sample`'s sha256 of seed and uid), so the calibration sample is
   drawn without the uid list.

`join` maps other files' uid columns to positions: a task per file writes (file, column, row,
uid) by uid bucket; a task per bucket joins them with `uidpos` and writes (file, column, row,
pos) sorted by file in row groups; `positions` reads one file's rows from every bucket (-1 for a
uid that is not a unique accepted image).

Memory: a task holds one ingest partition, one uid bucket or one order range, or one joined
file's uid columns. The bucket and range counts give a task at most `budget.order_records` of
the worker budget (`budget.current()`: `--worker-memory`; measured ~620 B a record) or, with no
budget, `RECORDS_PER_TASK`. The driver holds the key sample (`SAMPLE_PER_RANGE` a range in
all, at least a key a partition), the counts per (bucket, range) and ranges x m calibration keys.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd import durable
from lvd.curation import rundir, uidbuckets
from lvd.curation.copydetect import hash_key
from lvd.curation.scale import budget as budget_mod

RECORDS_PER_TASK = 2_000_000  # records a bucket or range task holds without a budget (~1.2 GB)
SAMPLE_PER_RANGE = 200  # order keys sampled per range: its cut within ~10% of even
GROUP_ROWS = 16_384
_KEY = [("source", "ascending"), ("part", "ascending"), ("row", "ascending")]
NODE_SCHEMA = pa.schema(
    [("pos", pa.int64()), ("uid", pa.string()), ("pixels", pa.int64()), ("log_aspect", pa.float64())]
)


@dataclass(frozen=True)
class PoolOrder:
    """What `number` gives: the pool size, the position ranges' folder and the calibration sample."""

    n: int
    work: str  # scratch folder: nodes/, uidpos/
    S: int  # positions per range of nodes/
    buckets: int  # uid buckets of uidpos/
    sample: list[str]  # the calibration sample's uids, in position order (calibration_sample's rows)

    @property
    def uids(self) -> NodeUids:
        return NodeUids(self.work, self.n, self.S)


@dataclass(frozen=True)
class NodeUids:
    """The pool's uids by position, read from the node files on demand (a sequence: len, an
    index, a slice, `take`); `uid_chunks` gives one loader per position range, which a shard calls
    itself (`scale.shardindex`), so no process is handed the list."""

    work: str
    n: int
    S: int

    def __len__(self) -> int:
        return self.n

    def range_uids(self, r: int) -> list[str]:
        return RangeUids(self.work, r)()

    def take(self, pos) -> list[str]:
        pos = np.asarray(pos, np.int64)
        out = np.empty(len(pos), object)
        for r in np.unique(pos // self.S):
            sel = pos // self.S == r
            out[sel] = np.asarray(self.range_uids(int(r)), object)[pos[sel] - r * self.S]
        return out.tolist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(self.n)[i])
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.take([i % self.n])[0]

    def __iter__(self):
        for r in range(-(-self.n // self.S)):
            yield from self.range_uids(r)

    def uid_chunks(self) -> list[tuple[int, RangeUids]]:
        return [(r * self.S, RangeUids(self.work, r)) for r in range(-(-self.n // self.S))]


@dataclass(frozen=True)
class RangeUids:
    """Loader of one position range's uids (called where the list is needed)."""

    work: str
    r: int

    def __call__(self) -> list[str]:
        return nodes(self.work, self.r)["uid"].to_pylist()


def nodes(work: str | Path, r: int) -> pa.Table:
    """Position range r's node rows (pos, uid, pixels, log_aspect), sorted by position."""
    d = Path(work) / "nodes" / f"r{r}"
    files = sorted(d.glob("*.parquet")) if d.exists() else []
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else NODE_SCHEMA.empty_table()
    return t.sort_by("pos")


def _write(t: pa.Table, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, t, **kwargs)


def wave(fn, args: list[tuple], opts: dict) -> list:
    """`[fn(*a) for a in args]` as Ray tasks with `opts`, results in order."""
    remote = ray.remote(fn).options(**opts)
    return ray.get([remote.remote(*a) for a in args])


_wave = wave


def tasks_for(records: int, per_task: int = RECORDS_PER_TASK) -> int:
    return max(1, -(-int(records) // per_task))


# ---------------------------------------------------------------- the order


def number(run_dir: Path, work: Path, S: int, opts: dict, *, calib: tuple[int, int] = (0, 0),
           buckets: int | None = None, ranges: int | None = None) -> PoolOrder:  # fmt: skip
    """Steps 1-3 of the module doc under `work`; `calib` = (sample size m, seed)."""
    run, work = Path(run_dir), Path(work)
    manifests = rundir.ingest_manifests(run)
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run).values())
    budget = budget_mod.current()
    per_task = budget_mod.order_records(budget) if budget is not None else RECORDS_PER_TASK
    B = buckets or tasks_for(records, per_task)
    J = ranges or tasks_for(records, per_task)
    per_part = -(-J * SAMPLE_PER_RANGE // max(1, len(manifests)))  # the sample: ~SAMPLE_PER_RANGE a range in all
    samples = _wave(_map, [(str(run), str(work), c, str(p), B, per_part) for c, p in enumerate(manifests)], opts)
    bounds = cut(pa.concat_tables(samples) if samples else _SAMPLE.empty_table(), J)
    got = _wave(_first, [(str(work), b, bounds, J) for b in range(B)], opts)
    counts = np.sum(got, axis=0) if got else np.zeros(J, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m, seed = calib
    found = _wave(_number, [(str(work), j, int(offsets[j]), S, B, m, seed) for j in range(J) if counts[j]], opts)
    best = heapq.nsmallest(m, (x for f in found for x in f)) if m else []
    sample = [u for _, _, u in sorted(best, key=lambda x: x[1])]
    return PoolOrder(int(offsets[-1]), str(work), S, B, sample)


_SAMPLE = pa.schema([("source", pa.string()), ("part", pa.int64()), ("row", pa.int64()), ("weight", pa.float64())])


def _map(run: str, work: str, c: int, manifest: str, B: int, samples: int) -> pa.Table:
    """Step 1: partition c's accepted records by uid bucket; -> its weighted key sample."""
    t = rundir.apply_caps(Path(run), pq.read_table(manifest, columns=["uid", "status", "source", "width", "height"]))
    rows = np.flatnonzero(t["status"].to_numpy(zero_copy_only=False) == "accepted")
    rec = t.take(rows).drop_columns(["status"])
    rec = rec.append_column("part", pa.array(np.full(len(rows), c, np.int64)))
    rec = rec.append_column("row", pa.array(rows.astype(np.int64)))
    uidbuckets.write_sorted(rec, Path(work) / "map" / f"c{c:06d}.parquet", B)
    if not len(rows):
        return _SAMPLE.empty_table()
    keys = rec.select(["source", "part", "row"]).sort_by(_KEY)
    take = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), max(1, samples))).astype(np.int64))
    k = keys.take(pa.array(take))
    return k.append_column("weight", pa.array(np.full(len(take), len(rows) / len(take)))).cast(_SAMPLE)


def cut(sample: pa.Table, J: int) -> pa.Table:
    """J - 1 bound keys (source, part, row): the sample's weighted quantiles, in key order."""
    if J < 2 or not sample.num_rows:
        return sample.select(["source", "part", "row"]).slice(0, 0)
    s = sample.sort_by(_KEY)
    w = np.cumsum(s["weight"].to_numpy())
    at = np.searchsorted(w, w[-1] * np.arange(1, J) / J, side="left")
    return s.select(["source", "part", "row"]).take(pa.array(np.minimum(at, s.num_rows - 1)))


def range_of(keys: pa.Table, bounds: pa.Table) -> np.ndarray:
    """int64 [n]: the order range of each key: the number of bounds <= it (Arrow's key order)."""
    n = keys.num_rows
    if not bounds.num_rows:
        return np.zeros(n, np.int64)
    key = _SAMPLE.remove(3)
    both = pa.concat_tables([
        keys.select(key.names).cast(key).append_column("_b", pa.array(np.ones(n, np.int8))),
        bounds.select(key.names).cast(key).append_column("_b", pa.array(np.zeros(bounds.num_rows, np.int8))),
    ])  # fmt: skip
    both = both.append_column("_i", pa.array(np.arange(both.num_rows, dtype=np.int64)))
    order = both.sort_by([*_KEY, ("_b", "ascending")])  # a bound sorts before the key equal to it
    is_bound = order["_b"].to_numpy() == 0
    before = np.cumsum(is_bound)[~is_bound]
    out = np.empty(n, np.int64)
    out[order["_i"].to_numpy()[~is_bound]] = before
    return out


def _first(work: str, b: int, bounds: pa.Table, J: int) -> np.ndarray:
    """Step 2: bucket b's first record of each uid, by order range; -> records per range."""
    d = Path(work) / "map"
    mine = pc.field("bucket") == b
    parts = [pq.read_table(p, filters=mine) for p in sorted(d.glob("c*.parquet"))]
    rec = pa.concat_tables(parts).drop_columns(["bucket"]) if parts else None
    counts = np.zeros(J, np.int64)
    if rec is None or not rec.num_rows:
        return counts
    rec = rec.sort_by([("uid", "ascending"), *_KEY])
    u = rec["uid"].to_numpy(zero_copy_only=False)
    rec = rec.filter(pa.array(np.r_[True, u[1:] != u[:-1]]))
    j = range_of(rec, bounds)
    for x in np.unique(j):
        _write(rec.take(np.flatnonzero(j == x)), Path(work) / "order" / f"j{x}" / f"b{b}.parquet")
    return counts + np.bincount(j, minlength=J)


def _number(work: str, j: int, offset: int, S: int, B: int, m: int, seed: int) -> list[tuple[int, int, str]]:
    """Step 3: range j's records in key order get positions offset + rank; writes its node rows
    and uid -> position rows; -> its m smallest (calibration key, position, uid)."""
    d = Path(work) / "order" / f"j{j}"
    rec = pa.concat_tables([pq.read_table(f) for f in sorted(d.glob("*.parquet"))]).sort_by(_KEY)
    n = rec.num_rows
    pos = np.arange(offset, offset + n, dtype=np.int64)
    w, h = rec["width"].to_numpy().astype(np.int64), rec["height"].to_numpy().astype(np.int64)
    t = pa.table({"pos": pos, "uid": rec["uid"], "pixels": w * h, "log_aspect": np.log(w / np.maximum(h, 1))},
                 schema=NODE_SCHEMA)  # fmt: skip
    r = pos // S
    for x in np.unique(r):
        _write(t.filter(pa.array(r == x)), Path(work) / "nodes" / f"r{x}" / f"j{j}.parquet")
    uidbuckets.write_sorted(t.select(["uid", "pos"]), Path(work) / "uidpos" / f"j{j:06d}.parquet", B)
    if not m:
        return []
    uids = rec["uid"].to_pylist()
    return heapq.nsmallest(m, ((hash_key(u, seed), int(p), u) for u, p in zip(uids, pos.tolist())))


# ---------------------------------------------------------------- uid -> position joins


def join(order: PoolOrder, name: str, files: list[tuple[str, list[str], int | None]], opts: dict) -> None:
    """Positions of the uid columns of `files` ((path, columns, row group or None for the whole
    file), numbered by list index c), for `positions(order, name, c)`."""
    _wave(_keys, [(order.work, name, c, p, cols, g, order.buckets) for c, (p, cols, g) in enumerate(files)], opts)
    _wave(_join, [(order.work, name, b) for b in range(order.buckets)], opts)


def _keys(work: str, name: str, c: int, path: str, columns: list[str], group: int | None, B: int) -> None:
    f = pq.ParquetFile(path)
    t = f.read(columns=columns) if group is None else f.read_row_group(group, columns=columns)
    n = t.num_rows
    rows = pa.array(np.arange(n, dtype=np.int64))
    keys = pa.concat_tables([
        pa.table({"uid": t[col].cast(pa.string()), "c": pa.array(np.full(n, c, np.int64)),
                  "k": pa.array(np.full(n, k, np.int64)), "row": rows})
        for k, col in enumerate(columns)
    ])  # fmt: skip
    uidbuckets.write_sorted(keys, Path(work) / "keys" / name / f"c{c:06d}.parquet", B)


def _join(work: str, name: str, b: int) -> None:
    mine = pc.field("bucket") == b
    w = Path(work)
    keys = [pq.read_table(p, filters=mine) for p in sorted((w / "keys" / name).glob("c*.parquet"))]
    pos = [pq.read_table(p, filters=mine) for p in sorted((w / "uidpos").glob("j*.parquet"))]
    if not keys:
        return
    k = pa.concat_tables(keys).drop_columns(["bucket"])
    p = pa.concat_tables(pos).drop_columns(["bucket"]) if pos else pa.table({"uid": pa.array([], pa.string()),
                                                                               "pos": pa.array([], pa.int64())})  # fmt: skip
    j = k.join(p, "uid", join_type="left outer").drop_columns(["uid"])
    j = j.set_column(j.schema.get_field_index("pos"), "pos", pc.fill_null(j["pos"], -1)).sort_by("c")
    _write(j, w / "joined" / name / f"b{b:05d}.parquet", row_group_size=GROUP_ROWS)


def positions(work: str | Path, name: str, c: int, n_rows: int, n_columns: int = 1) -> np.ndarray:
    """int64 [n_columns, n_rows]: the position of each row's uid per column of file c (-1: not a
    unique accepted image)."""
    out = np.full((n_columns, n_rows), -1, np.int64)
    d = Path(work) / "joined" / name
    for f in sorted(d.glob("b*.parquet")) if d.exists() else []:
        t = pq.read_table(f, filters=pc.field("c") == c, columns=["k", "row", "pos"])
        out[t["k"].to_numpy(), t["row"].to_numpy()] = t["pos"].to_numpy()
    return out
