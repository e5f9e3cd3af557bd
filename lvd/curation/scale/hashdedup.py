"""Hash near-duplicate dedup partitioned over Ray: no process holds the pool.

The same decision as `dedup.find_near_duplicates`, reached over Parquet parts under a
scratch folder:

1. exact pass. A map task per input part writes each record to bucket hash(record) mod
   `exact_buckets` and samples its records' (log aspect, record id) keys. The driver cuts that
   order into `buckets` slices at the samples' weighted quantiles (`slice_bounds`; ties of
   aspect by id, so a pool of squares is cut too). A reduce task per bucket keeps one record
   per uid, links records equal in every compared column to the first of them (edges of
   distance 0, channel `exact`), and passes the first ones on, each to its slice's block
   (`reps/a{k}/e{bucket}`): a block is one slice of the whole pool's aspects, ~N / buckets
   records whatever the exact buckets (a pool of a thousand blank images sends one). Before,
   each bucket cut its own records into ceil(buckets / exact_buckets) slices, so the exact
   pass's memory (more buckets) and the pair pass's work (fewer, wider slices) pulled apart.
2. block pairs. For every code `dedup.candidate_codes` names (one per column, at the largest
   radius R of its channels) a task per block j indexes block j's codes (`SortedIndex`:
   exact multi-index hashing, chunks with up to f flips each planned per code width, radius
   and block size, on 1/blocks of the pool) and queries it with blocks 0..j, one at a time, so every
   pair of records is looked at by exactly one task: that of its later block. Blocks whose
   aspects lie further apart than `max_aspect_ratio` are not paired: every channel checks the
   aspect (`dedup.aspect_reach`), so no pair between them is linked (a block pairs with the
   slices within log 1.1 of its own: on the synthetic pool's uniform aspects, 56 blocks at
   10^7, about a third of the block pairs). A column with
   variants (the equalised channel's clipped codes) is searched as dedup does, one record's
   `column` code against any code of the other: block j's versions are indexed and queried
   by block i's `column` codes, and block i's versions indexed and queried by block j's.
   Candidate pairs: within R bits, one code a record's own `column` code.
3. verify, same task. `dedup.table_edges` on the records the candidates touch (read from their
   blocks, in input order: the single-process check, all channels, so a new per-pair check
   applies here unchanged) and keeps the edges that are its candidates (`edges/`: uid_a,
   uid_b, pixels, channel, distance).
4. components (`scale.components`) over the edge partitions, then one row per
   non-representative uid, sorted by uid: `DUPLICATES_SCHEMA`, equal to the single process.

Why the output is equal: every pair the single process links is within its channel's
radius on its code, so the task of the pair's later block finds it (the index is exact),
and runs the same verification on the two records; verification looks at the two
records only, and `dedup.resolve`'s representative (most pixels, then smallest uid) and
distance (smallest pHash distance over a node's edges) depend only on the edges. One caveat:
rows dedup treats as identical (its collapse: equal hashes and aspect bucket, not equal size)
are matched through the first of them in input order; records are ordered by (part, row),
which is the single process's order when parts are in source order, as ingest writes them.

Memory: an exact-pass task holds one input part or one bucket (N / exact_buckets records,
~4.6 KB each at the reduce's peak, `budget.EXACT_RECORD_BYTES`); a block-pair task holds block j's codes and indexes
(~`PAIR_RECORD_BYTES` per record, measured) plus one other block's codes, its candidate pairs
and the records they touch. Work: each record queries (blocks + 1) / 2 indexes of N / blocks
codes; the single process queries one of N codes (fewer blocks: less work, more memory). A
query's lookups are fixed by its plan, but its candidates grow with the index (tables are at
most 2^22): the candidate checks over all tasks grow as N^2 whatever the blocks (most of the
pair pass at 250,000-record blocks); only chunks wider than 2^22 tables allow, with more
flips each, would lower them (the 256-bit codes at R=24-28 have 9-10 bits per unit of radius).
Before this, a shuffle of ~60 B keys (154 per record: one per 9-10 bit chunk of each code
version) compared all pairs of equal chunks: work grew as N^2 / 2^9
(benchmarks/partitioned_dedup.py --baseline-tree runs it).
The final table (one row per duplicate) is assembled by one task, not by the driver.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd.curation import dedup, rundir
from lvd.curation.scale.budget import PAIR_RECORD_BYTES  # noqa: F401 - measured there, named in this doc
from lvd.curation.scale.components import ComponentsConfig, _write, components

EDGE_SCHEMA = pa.schema(
    [("uid_a", pa.string()), ("uid_b", pa.string()), ("pixels_a", pa.int64()), ("pixels_b", pa.int64()),
     ("channel", pa.string()), ("distance", pa.float64())]
)  # fmt: skip
METHOD = "phash"  # the method name dedup.near_duplicate_edges gives its edges
_NOT_COMPARED = rundir.NOT_FOR_DEDUP | {"status", "source", "detail"}
_RID = "_rid"  # (input part << 32) | row: the input order, and a record's id in the shuffle
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PROBES = 1 << 15  # lookups of a SortedIndex at once: temporaries in cache (2^22 at once: 3x slower a lookup)
_CHUNK_BITS = 22  # widest chunk of a SortedIndex: a table of 2^22 starts (16 MiB) per chunk
_MAX_FLIPS = 4  # most flips per chunk _plan considers (C(22, 4) = 7,315 masks)
# _plan's costs in lookups (~5-10 ns each here): a candidate's check (~80 ns: random gathers of
# starts, order and code words); per indexed code and chunk, a table entry (~5 ns: bincount,
# cumsum) and the sort (~40 ns), as if each code were queried once (a block's is, at least)
_LOOKUP, _CHECK, _TABLE, _SORT = 1.0, 10.0, 0.7, 5.0


@dataclass(frozen=True, kw_only=True)
class ShuffleConfig:
    """Sizes of the shuffle (`budget.hash_block_count` and `hash_bucket_count` give them from a budget)."""

    # blocks of the pair pass (slices of the pool's aspect order, whatever the exact buckets): a
    # task indexes one block (~N / blocks records) and queries it with the blocks before it
    # within aspect reach; fewer blocks, less work (each record queries up to (blocks + 1) / 2)
    buckets: int = 16
    exact_buckets: int = 8  # buckets of the exact pass; a reduce task holds ~N / exact_buckets records
    partitions: int = 8  # node partitions of the connected components
    task_options: dict = field(default_factory=dict)  # Ray options of every task (budget.ray_options)

    def __post_init__(self):
        for name in ("buckets", "exact_buckets", "partitions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use at least 1")


@dataclass(frozen=True)
class Source:
    """One input part: a Parquet file of hash records. With `run_dir`, an ingest partition:
    its accepted records are read, with the run's per-domain cap applied (rundir)."""

    path: str
    run_dir: str | None = None


@dataclass(frozen=True)
class Code:
    """A code column the pair pass searches: its largest radius over dedup's channels."""

    column: str
    radius: int
    channels: str  # dedup channel names searched on this column, '+'-joined
    # a column of more codes per row, each searched against the others' `column` code
    # (dedup.CandidateCode.variants)
    variants: str | None = None


@dataclass(frozen=True)
class HashDedupReport:
    duplicates: Path  # DUPLICATES_SCHEMA rows, sorted by uid
    records: int  # input records compared (accepted, one per uid)
    blocks: int  # blocks of the pair pass
    candidates: int  # record pairs within a code's radius (each looked at by one task)
    edges: int
    phases: int  # star steps of the components
    block_pairs: int = 0  # (block i, block j >= i) pairs searched: those whose aspects come within reach


def run_sources(run_dir: Path) -> list[Source]:
    """The done ingest partitions of a run, in partition order."""
    return [Source(str(p), str(run_dir)) for p in rundir.ingest_manifests(run_dir)]


def folder_sources(folder: Path) -> list[Source]:
    """Every *.parquet of a folder of hash parts (uid, width, height, phash, dhash and the code
    columns), sorted by name: the entry point of benchmarks and synthetic pools."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no *.parquet hash parts under {folder}")
    return [Source(str(p)) for p in files]


def codes_of(cfg: dedup.DedupConfig, nbits_of: dict[str, int]) -> list[Code]:
    """Each column `dedup.candidate_codes` searches, at its largest radius (`nbits_of`: the bits
    of the records' fixed-width columns, to refuse a column that is missing or not a code)."""
    radius: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    variants: dict[str, str | None] = {}
    for c in dedup.candidate_codes(cfg):
        radius[c.column] = max(radius.get(c.column, 0), c.radius)
        names.setdefault(c.column, []).append(c.channel)
        if variants.setdefault(c.column, c.variants) != c.variants:
            raise ValueError(f"column {c.column!r}: channels search it with other variant columns")
    out = []
    for column in sorted(radius):
        if nbits_of.get(column, 0) % 8 or not nbits_of.get(column):
            raise ValueError(f"column {column!r}: dedup searches it as a code; the records have no such column")
        out.append(Code(column, radius[column], "+".join(names[column]), variants[column]))
    return out


def partitioned_duplicates(
    sources: list[Source], cfg: dedup.DedupConfig, work_dir: Path, shuffle: ShuffleConfig = ShuffleConfig()
) -> HashDedupReport:
    """`dedup.find_near_duplicates` of the sources' records, partitioned (module doc); leaves
    the table in `work_dir/duplicates.parquet`. Needs a running Ray."""
    work = Path(work_dir)
    opts = {"num_cpus": 1, "max_retries": 3, **shuffle.task_options}
    plan = exact_pass(sources, cfg, work, shuffle)
    done = pair_pass(plan, cfg, work, shuffle)
    candidates, edges, _ = (sum(x) for x in zip(*done))
    files = sorted((work / "edges").glob("*.parquet"))
    comp_cfg = ComponentsConfig(partitions=shuffle.partitions, task_options=shuffle.task_options)
    comps = components(files, work / "components", comp_cfg)
    out = work / "duplicates.parquet"
    ray.get(ray.remote(_assemble).options(**opts).remote([str(p) for p in comps.outputs], str(out)))
    return HashDedupReport(
        duplicates=out, records=plan.records, blocks=len(plan.blocks), candidates=candidates, edges=edges,
        phases=comps.phases, block_pairs=plan.block_pairs,
    )  # fmt: skip


@dataclass(frozen=True)
class PairPlan:
    """What the exact pass leaves for the pair pass: the blocks and which block pairs to search."""

    records: int  # input records compared (one per uid)
    blocks: list[str]  # block files, in block order
    codes: list[Code]
    others: list[list[int]]  # per block j: the blocks i <= j its task searches (aspects within reach)
    order: list[int]  # blocks by descending len(others): the order the tasks are started in

    @property
    def block_pairs(self) -> int:
        return sum(len(o) for o in self.others)


def exact_pass(sources: list[Source], cfg: dedup.DedupConfig, work: Path, shuffle: ShuffleConfig) -> PairPlan:
    """Step 1 of the module doc: the exact map and reduce waves, then the pair pass's plan.

    Blocks are slices of the whole pool's (log aspect, record id) order, their bounds the
    weighted quantiles of the keys the map tasks sample (`SAMPLE_PER_BLOCK` a block in all):
    each bucket's reduce writes its representatives of slice k under `reps/a{k}/`, so a block
    is every bucket's share of one slice, about N / blocks records whatever the buckets."""
    opts = {"num_cpus": 1, "max_retries": 3, **shuffle.task_options}
    E, blocks_wanted = shuffle.exact_buckets, shuffle.buckets
    reach = dedup.aspect_reach(cfg)
    per_part = max(1, math.ceil(SAMPLE_PER_BLOCK * blocks_wanted / max(1, len(sources))))
    mapped = _wave(_exact_map, [(s, i, str(work), E, per_part, reach is not None) for i, s in enumerate(sources)], opts)
    bounds = slice_bounds([m[1] for m in mapped], blocks_wanted)
    reduced = _wave(_exact_reduce, [(str(work), e, bounds, reach is not None) for e in range(E)], opts)
    slices: dict[int, tuple[int, float, float]] = {}
    for _, got in reduced:
        for k, (count, lo, hi) in got.items():
            c0, lo0, hi0 = slices.get(k, (0, lo, hi))
            slices[k] = (c0 + count, min(lo0, lo), max(hi0, hi))
    kept = sorted(slices)  # slices no bucket holds a record of are no block
    blocks = [str(work / "reps" / f"a{k:05d}") for k in kept]
    ranges = [slices[k][1:] for k in kept]
    others = [[i for i in range(j + 1) if _near(ranges[i], ranges[j], reach)] for j in range(len(blocks))]
    # the last blocks' tasks query the most blocks: started first, so the waves end together
    order = sorted(range(len(blocks)), key=lambda j: -len(others[j]))
    records = sum(n for n, _ in reduced)
    return PairPlan(records, blocks, codes_of(cfg, _code_bits(work)), others, order)


SAMPLE_PER_BLOCK = 1000  # sampled keys a block: its size within a few % of N / blocks


def slice_bounds(samples: list[tuple[np.ndarray, np.ndarray, float]], blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(log aspects, record ids) float64 / int64 [<= blocks - 1]: the first key of slices 1..,
    the weighted quantiles at k / blocks of the sampled keys (each map's (aspects, ids, weight:
    its records per sampled key)). Ties of aspect are cut by record id, so a pool of one aspect
    still gets `blocks` slices."""
    a = np.concatenate([s[0] for s in samples]) if samples else np.zeros(0)
    r = np.concatenate([s[1] for s in samples]).astype(np.int64) if samples else np.zeros(0, np.int64)
    w = np.concatenate([np.full(len(s[0]), s[2]) for s in samples]) if samples else np.zeros(0)
    if blocks < 2 or not len(a):
        return np.zeros(0), np.zeros(0, np.int64)
    order = np.lexsort((r, a))
    cum = np.cumsum(w[order])
    at = np.searchsorted(cum, cum[-1] * np.arange(1, blocks) / blocks, side="right")
    at = np.unique(np.minimum(at, len(order) - 1))
    return a[order][at], r[order][at]


def slice_of(aspect: np.ndarray, rid: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """int64 [n]: the slice of each (aspect, rid) key: the number of bounds at or before it."""
    ba, br = bounds
    n = len(aspect)
    keys_a = np.concatenate([aspect, ba])
    keys_r = np.concatenate([np.asarray(rid, np.int64), br])
    is_rec = np.r_[np.ones(n, np.int8), np.zeros(len(ba), np.int8)]  # a bound before an equal key
    order = np.lexsort((is_rec, keys_r, keys_a))
    before = np.cumsum(is_rec[order] == 0)
    out = np.empty(n + len(ba), np.int64)
    out[order] = before
    return out[:n]


def pair_pass(
    plan: PairPlan, cfg: dedup.DedupConfig, work: Path, shuffle: ShuffleConfig, tasks: list[int] | None = None
) -> list[tuple[int, int, float]]:
    """Steps 2 and 3: a task per block j (all, in `plan.order`; or the blocks `tasks` only, as
    the scale benchmark samples them), each writing `edges/b{j}`; (candidates, edges, the
    task's seconds) per task."""
    opts = {"num_cpus": 1, "max_retries": 3, **shuffle.task_options}
    todo = plan.order if tasks is None else tasks
    return _wave(_block_pairs, [(str(work), plan.blocks, j, plan.codes, cfg, plan.others[j]) for j in todo], opts)


def _near(a: tuple[float, float] | None, b: tuple[float, float] | None, reach: float | None) -> bool:
    """Whether two blocks (log aspect (min, max) each, None: empty) may hold a linked pair:
    both hold records, and their aspects come within `reach` (None: no aspect check, all pairs)."""
    if a is None or b is None:
        return False
    return reach is None or max(a[0] - b[1], b[0] - a[1]) <= reach


def assemble(outputs: list[Path]) -> pa.Table:
    """The components' per-partition rows as one DUPLICATES_SCHEMA table, sorted by uid."""
    parts = [pq.read_table(p) for p in outputs]
    t = pa.concat_tables(parts) if parts else pa.table({"uid": [], "duplicate_of": [], "distance": []})
    table = pa.table(
        {
            "uid": t["uid"].cast(pa.string()),
            "duplicate_of": t["duplicate_of"].cast(pa.string()),
            "method": pa.array([METHOD] * t.num_rows, pa.string()),
            "distance": t["distance"].cast(pa.float64()),
        },
        schema=dedup.DUPLICATES_SCHEMA,
    )
    return table.sort_by([("uid", "ascending")])


def _assemble(outputs: list[str], out: str) -> None:
    _write(assemble([Path(p) for p in outputs]), Path(out))


def _wave(fn, args: list[tuple], opts: dict) -> list:
    remote = ray.remote(fn).options(**opts)
    return ray.get([remote.remote(*a) for a in args])


# ---------------------------------------------------------------- reading and codes


def read_source(source: Source) -> pa.Table:
    """One part's records with the compared columns only (accepted ones, for an ingest part)."""
    names = pq.read_schema(source.path).names
    if source.run_dir is None:
        return pq.read_table(source.path, columns=[c for c in names if c not in _NOT_COMPARED])
    t = pq.read_table(source.path, columns=[c for c in names if c not in _NOT_COMPARED - {"status", "source"}])
    t = rundir.apply_caps(Path(source.run_dir), t)
    return t.filter(pc.equal(t["status"], "accepted")).drop_columns(["status", "source"])


def _check(table: pa.Table, where: str) -> None:
    missing = {"uid", "width", "height", "phash", "dhash"} - set(table.column_names)
    if missing:
        raise ValueError(f"{where}: hash records need columns {sorted(missing)} (from the ingest manifest)")
    nulls = [c for c in table.column_names if table[c].null_count]
    if nulls:
        raise ValueError(f"{where}: columns {nulls} have nulls: pass accepted records only")


def _row_bytes(table: pa.Table, columns: list[str]) -> np.ndarray:
    """uint8 [n, k]: the fixed-width bytes of `columns`, side by side."""
    parts = []
    for c in columns:
        col = table[c].combine_chunks()
        if pa.types.is_fixed_size_binary(col.type):
            width = col.type.byte_width
            raw = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * width : (col.offset + len(col)) * width]
            parts.append(raw.reshape(len(col), width))
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            arr = np.ascontiguousarray(col.to_numpy())
            parts.append(arr.view(np.uint8).reshape(len(col), arr.dtype.itemsize))
        else:
            raise ValueError(f"column {c!r} ({col.type}) cannot be compared byte by byte; drop it from the hash parts")
    return np.ascontiguousarray(np.concatenate(parts, axis=1)) if parts else np.zeros((table.num_rows, 0), np.uint8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a stable 64-bit hash of each uint64."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _hash_rows(data: np.ndarray) -> np.ndarray:
    """A stable uint64 hash of each row of uint8 [n, k]."""
    pad = (-data.shape[1]) % 8
    words = np.pad(data, ((0, 0), (0, pad))).view(np.uint64)
    h = np.full(len(data), np.uint64(data.shape[1]))
    for w in range(words.shape[1]):
        h = _mix(h ^ words[:, w])
    return h


def _compared(table: pa.Table) -> list[str]:
    return sorted(c for c in table.column_names if c not in ("uid", _RID))


def _code_words(table: pa.Table, column: str) -> np.ndarray:
    """uint64 [n, w]: a code column's bits as words (a uint64 column is one word)."""
    return _row_bytes(table, [column]).view(np.uint64)


def code_versions(table: pa.Table, code: Code) -> np.ndarray:
    """uint64 [n, 1 + V, w]: each record's `code.column` code, then its V variant codes."""
    plain = _code_words(table, code.column)
    if code.variants is None:
        return plain[:, None]
    more = _code_words(table, code.variants)
    if more.shape[1] % plain.shape[1]:
        raise ValueError(f"column {code.variants!r} must hold whole codes of {code.column!r}'s width")
    more = more.reshape(len(plain), more.shape[1] // plain.shape[1], plain.shape[1])
    return np.concatenate([plain[:, None], more], axis=1)


def _code_bits(work: Path) -> dict[str, int]:
    """Bits of every fixed-width column of the records (from one reps part's schema)."""
    schema = pq.read_schema(next((work / "exact").rglob("*.parquet")))  # every map writes every bucket
    out = {}
    for f in schema:
        if pa.types.is_fixed_size_binary(f.type):
            out[f.name] = 8 * f.type.byte_width
        elif pa.types.is_integer(f.type):
            out[f.name] = f.type.bit_width
    return out


# ---------------------------------------------------------------- exact pass


def _exact_map(source: Source, index: int, work: str, E: int, sample: int, by_aspect: bool) -> tuple[int, tuple]:
    """Each record to its bucket; returns (records, a sample of `sample` of their slice keys:
    (log aspects, record ids, records per sampled key))."""
    t = read_source(source)
    _check(t, source.path)
    rid = (np.int64(index) << 32) + np.arange(t.num_rows, dtype=np.int64)
    t = t.append_column(_RID, pa.array(rid))
    bucket = (_hash_rows(_row_bytes(t, _compared(t))) % np.uint64(E)).astype(np.int64)
    for e in range(E):
        _write(t.take(np.flatnonzero(bucket == e)), Path(work) / "exact" / f"b{e}" / f"s{index}.parquet")
    pick = np.sort(np.random.default_rng(index).permutation(t.num_rows)[:sample])
    aspect = _slice_aspect(t.take(pick), by_aspect)
    return t.num_rows, (aspect, rid[pick], t.num_rows / max(1, len(pick)))


def _slice_aspect(t: pa.Table, by_aspect: bool) -> np.ndarray:
    """The aspect part of the slice key (0 when no channel checks the aspect: slices by id)."""
    if not by_aspect:
        return np.zeros(t.num_rows)
    return dedup.log_aspects(t["width"].to_numpy(), t["height"].to_numpy())


def _exact_reduce(work: str, e: int, bounds: tuple, by_aspect: bool) -> tuple[int, dict]:
    """One record per uid; records equal in every compared column chain to the first, the
    first ones written to their slice's block (`reps/a{k}/e{e}`; slices: `bounds`, from
    `slice_bounds`). Returns the bucket's number of uids and, per slice it holds records of,
    (records, log aspect min, max)."""
    files = sorted((Path(work) / "exact" / f"b{e}").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]).sort_by(_RID)
    uids = t["uid"].to_numpy(zero_copy_only=False)
    _, first_of_uid = np.unique(uids, return_index=True)
    del uids
    t = t.take(np.sort(first_of_uid))
    data = _row_bytes(t, _compared(t))
    _, first, group = np.unique(data.view(np.dtype((np.void, data.shape[1]))).ravel(), return_index=True, return_inverse=True)  # fmt: skip
    group = group.ravel()
    members = np.flatnonzero(~np.isin(np.arange(t.num_rows), first))
    _write(_edges(t, first[group[members]], members, "exact", np.zeros(len(members))), Path(work) / "edges" / f"exact-{e}.parquet")  # fmt: skip
    del data, group, members
    reps, n_uids = t.take(np.sort(first)), t.num_rows
    del t
    aspect = dedup.log_aspects(reps["width"].to_numpy(), reps["height"].to_numpy())
    where = slice_of(aspect if by_aspect else np.zeros(len(aspect)), reps[_RID].to_numpy(), bounds)
    out = {}
    for k in np.unique(where).tolist():
        rows = np.flatnonzero(where == k)
        _write(reps.take(rows), Path(work) / "reps" / f"a{k:05d}" / f"e{e:05d}.parquet")
        out[k] = (len(rows), float(aspect[rows].min()), float(aspect[rows].max()))
    return n_uids, out


def _read_block(path: str, columns: list[str] | None = None) -> pa.Table:
    """One block: every bucket's part of its slice (`reps/a{k}/e*.parquet`), in bucket order."""
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in sorted(Path(path).glob("*.parquet"))])


def _edges(t: pa.Table, a: np.ndarray, b: np.ndarray, channel: str, distance: np.ndarray) -> pa.Table:
    pixels = t["width"].to_numpy().astype(np.int64) * t["height"].to_numpy().astype(np.int64)
    uid = t["uid"]
    return pa.table(
        {"uid_a": uid.take(a), "uid_b": uid.take(b), "pixels_a": pixels[a], "pixels_b": pixels[b],
         "channel": pa.array([channel] * len(a), pa.string()), "distance": np.asarray(distance, np.float64)},
        schema=EDGE_SCHEMA,
    )  # fmt: skip


# ---------------------------------------------------------------- block pairs and verification

PAIR_SCHEMA = pa.schema([("rid_a", pa.int64()), ("rid_b", pa.int64()), ("channel", pa.string())])


def _block_pairs(
    work: str, blocks: list[str], j: int, codes: list[Code], cfg: dedup.DedupConfig, others: list[int]
) -> tuple[int, int, float]:
    """The candidate pairs between block j and each block i <= j in `others` (those whose
    aspects come within reach of block j's), verified (module doc, steps 2 and 3); edges to
    `edges/b{j}`. Returns (candidate pairs, edges, seconds)."""
    t0 = time.perf_counter()
    columns = [_RID, *sorted({c for code in codes for c in (code.column, code.variants) if c})]
    mine = _read_block(blocks[j], columns)
    found, hit = [], []
    if mine.num_rows:
        indexes = [_CodeIndex(mine, code) for code in codes]
        for i in others:
            other = mine if i == j else _read_block(blocks[i], columns)
            for index in indexes:
                a, b = index.pairs(other, same=i == j)
                ra, rb = other[_RID].to_numpy()[a], mine[_RID].to_numpy()[b]
                found.append(pa.table(
                    {"rid_a": np.minimum(ra, rb), "rid_b": np.maximum(ra, rb),
                     "channel": pa.array([index.code.channels] * len(a), pa.string())}, schema=PAIR_SCHEMA,
                ))  # fmt: skip
                hit += [i] if len(a) else []
    cand = pa.concat_tables(found) if found else PAIR_SCHEMA.empty_table()
    cand = cand.group_by(["rid_a", "rid_b"]).aggregate([("channel", "min")])
    edges = _verify([blocks[i] for i in sorted(set(hit) | ({j} if hit else set()))], cand, cfg)
    _write(edges, Path(work) / "edges" / f"b{j:05d}.parquet")
    return cand.num_rows, edges.num_rows, time.perf_counter() - t0


class _CodeIndex:
    """One block's codes of one column (a record's `column` code, then its variants), every
    version indexed for exact search within `code.radius`."""

    def __init__(self, block: pa.Table, code: Code):
        self.code = code
        versions = code_versions(block, code)  # uint64 [n, k, w]
        n, self.k, w = versions.shape
        self.every = SortedIndex(versions.reshape(n * self.k, w), code.radius)
        self.plain = np.ascontiguousarray(versions[:, 0])

    def pairs(self, other: pa.Table, *, same: bool) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `other`, rows of this block) with one's `column` code within the radius of
        a code of the other's; `same`: `other` is this block (a record never pairs itself)."""
        if other.num_rows == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        versions = code_versions(other, self.code)
        q, r = self.every.search(versions[:, 0])
        r //= self.k
        if self.k > 1 and not same:  # this block's `column` codes against other's variants:
            # an index of other's codes, not k - 1 queries per record (indexing a code is cheaper)
            vr, vq = SortedIndex(versions.reshape(-1, versions.shape[2]), self.code.radius).search(self.plain)
            q, r = np.concatenate([q, vq // self.k]), np.concatenate([r, vr])
        keep = q != r if same else slice(None)
        return q[keep], r[keep]


class SortedIndex:
    """Exact search of codes within `radius` bits by multi-index hashing: the codes are cut into
    chunks k of width w_k searched with f_k flips, sum_k (f_k + 1) > radius (generalised
    pigeonhole: two codes differing in at least f_k + 1 bits of every chunk differ in more than
    `radius` bits, so a pair within the radius agrees up to f_k bits on some chunk k; bits of no
    chunk only add distance). `_plan` picks the chunks per code width, radius and index size to
    minimise lookups plus expected candidates per query (one flip per chunk, as before, forced
    5 chunks of 13 bits on a 64-bit pHash at radius 8: ~30 candidates a lookup at 250,000 codes).
    Per chunk the codes are sorted by value (radix argsort), with a table of where each value
    starts (2^w entries); a query looks up its value xor every mask of at most f_k bits by direct
    indexing, then checks the full distance word by word, dropping a candidate as soon as it is
    over. Faiss's `IndexBinaryMultiHash` (the single process's index) adds a code in ~30 us here
    (hash map inserts) against ~1 us for a sort; np.searchsorted spends ~100 ns a lookup."""

    def __init__(self, codes: np.ndarray, radius: int, plan: tuple[tuple[int, int], ...] | None = None):
        codes = np.ascontiguousarray(codes)  # uint64 [n, w]
        self.n, self.radius = len(codes), radius
        self.columns = [np.ascontiguousarray(codes[:, w]) for w in range(codes.shape[1])]
        plan = plan or _plan(64 * codes.shape[1], radius, max(1, math.ceil(math.log2(max(self.n, 2)))))
        if sum(f + 1 for _, f in plan) <= radius or sum(w for w, _ in plan) > 64 * codes.shape[1]:
            raise ValueError(f"plan {plan} does not cover radius {radius} on {64 * codes.shape[1]}-bit codes")
        self.flips = [f for _, f in plan]
        self.bounds = np.r_[0, np.cumsum([w for w, _ in plan])].tolist()
        self.tables = [self._table(codes, k) for k in range(len(plan))]

    def _table(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = _chunk(codes, self.bounds[k], self.bounds[k + 1])
        count = np.bincount(key.astype(np.intp), minlength=1 << (self.bounds[k + 1] - self.bounds[k]))
        starts = np.zeros(len(count) + 1, np.int32)  # n < 2^31
        np.cumsum(count.astype(np.int32), out=starts[1:])
        # a value's presence, one byte each: most lookups miss, and a gather of this 4x smaller
        # table, then starts only for the hits, is ~3x faster a lookup than two gathers of starts
        return count > 0, starts, _argsort_bits(key, self.bounds[k + 1] - self.bounds[k])

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, code row) of every code within the radius of a query (each pair once)."""
        queries = np.ascontiguousarray(queries)
        found = [np.zeros(0, np.int64)]
        n = max(self.n, 1)
        for k in range(len(self.tables)):
            masks = _masks(self.bounds[k + 1] - self.bounds[k], self.flips[k])
            step = max(1, _PROBES // len(masks))  # queries at once: temporaries of ~_PROBES entries
            for start in range(0, len(queries), step):
                q, x = self._chunk_hits(queries[start : start + step], k, masks)
                found.append((start + q) * n + x)
        pair = np.unique(np.concatenate(found))
        return pair // n, pair % n

    def _chunk_hits(self, batch: np.ndarray, k: int, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present, starts, order = self.tables[k]
        probe = (_chunk(batch, self.bounds[k], self.bounds[k + 1]).astype(np.intp)[:, None] ^ masks).ravel()
        hit = np.flatnonzero(present[probe])
        value = probe[hit]
        first = starts[value]
        size = starts[value + 1] - first
        ends = np.cumsum(size)
        q = np.repeat(hit // len(masks), size)
        x = order[np.repeat(first - ends + size, size) + np.arange(ends[-1] if len(ends) else 0)]
        dist = np.zeros(len(q), np.uint16)
        for w, column in enumerate(self.columns):  # word by word, dropping the candidates already over
            dist += np.bitwise_count(batch[q, w] ^ column[x])
            if w + 1 < len(self.columns):
                keep = np.flatnonzero(dist <= self.radius)
                q, x, dist = q[keep], x[keep], dist[keep]
        keep = dist <= self.radius
        return q[keep], x[keep]


@functools.lru_cache(maxsize=256)
def _plan(nbits: int, radius: int, size_bits: int) -> tuple[tuple[int, int], ...]:
    """Chunks (width, flips) of `SortedIndex` for `nbits`-bit codes at `radius`, ~2^size_bits
    codes indexed: sum(flips + 1) = radius + 1, widths summing to at most nbits, each at most
    `_CHUNK_BITS` and size_bits + 2 (a table of <= 4 entries a code: + 4 took
    1.5x the memory at 62,500 codes for no speed); the cheapest by
    sum over chunks of masks x (`_LOOKUP` + `_CHECK` x codes / 2^width) + a code's share of the
    chunk's table and sort (`_TABLE` x 2^width / codes + `_SORT`): a dynamic program over
    (points, bits used)."""
    need = radius + 1
    top = min(_CHUNK_BITS, size_bits + 2, nbits)
    options = [
        (w, f, _lookups(w, f) * (_LOOKUP + _CHECK * 2.0 ** (size_bits - w)) + _TABLE * 2.0 ** (w - size_bits) + _SORT)
        for w in range(1, top + 1) for f in range(min(_MAX_FLIPS, w - 1) + 1)
    ]  # fmt: skip
    cost = np.full((need + 1, nbits + 1), np.inf)
    cost[0, 0] = 0.0
    came = np.full((need + 1, nbits + 1, 2), -1, np.int64)  # (points before, option)
    for p in range(need):  # a chunk adds >= 1 point: rows below p are final
        if not np.isfinite(cost[p]).any():
            continue
        for o, (w, f, c) in enumerate(options):
            p2 = min(need, p + f + 1)
            new = cost[p, : nbits + 1 - w] + c
            better = np.flatnonzero(new < cost[p2, w:])
            cost[p2, w + better] = new[better]
            came[p2, w + better] = (p, o)
    b = int(np.argmin(cost[need]))
    if not np.isfinite(cost[need, b]):
        raise ValueError(f"radius {radius} cannot be searched exactly on {nbits}-bit codes in chunks")
    plan, p = [], need
    while p:
        p, o = came[p, b]
        plan.append(options[o][:2])
        b -= options[o][0]
    return tuple(sorted(plan, reverse=True))


def _lookups(width: int, flips: int) -> int:
    return sum(math.comb(width, f) for f in range(flips + 1))


@functools.lru_cache(maxsize=64)
def _masks(width: int, flips: int) -> np.ndarray:
    """intp [L]: every value of `width` bits with at most `flips` bits set (0 first)."""
    out = [sum(1 << b for b in bits) for f in range(flips + 1) for bits in itertools.combinations(range(width), f)]
    return np.array(out, np.intp)


def _argsort_bits(key: np.ndarray, bits: int) -> np.ndarray:
    """int32 order sorting `key` (uint64 values of `bits` bits): LSD radix by 16-bit digits
    (numpy's stable argsort of uint16 is a radix sort: ~4x faster than sorting int64)."""
    order = np.argsort((key & np.uint64(0xFFFF)).astype(np.uint16), kind="stable").astype(np.int32)
    for shift in range(16, bits, 16):
        digit = ((key >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.uint16)
        order = order[np.argsort(digit[order], kind="stable")]
    return order


def _chunk(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """uint64 [n]: bits lo:hi (at most 32) of each row of uint64 [n, w] (bit b: word b // 64)."""
    w, shift = divmod(lo, 64)
    value = words[:, w] >> np.uint64(shift)
    if shift + hi - lo > 64:
        value |= words[:, w + 1] << np.uint64(64 - shift)
    return value & np.uint64((1 << (hi - lo)) - 1)


def _verify(blocks: list[str], cand: pa.Table, cfg: dedup.DedupConfig) -> pa.Table:
    """`dedup.table_edges` on the records the candidate pairs touch (read from `blocks`), in
    input order; the edges that are candidates, with the smallest candidate channel name."""
    if cand.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    touched = pa.array(np.unique(np.concatenate([cand["rid_a"].to_numpy(), cand["rid_b"].to_numpy()])))
    parts = []
    for path in blocks:
        t = _read_block(path)
        parts.append(t.filter(pc.is_in(t[_RID], touched)))
    records = pa.concat_tables(parts).sort_by(_RID)
    found = dedup.table_edges(records, cfg)
    rid = records[_RID].to_numpy()
    got = pa.table({"rid_a": rid[found.a], "rid_b": rid[found.b], "i": np.arange(len(found))})
    hit = got.join(cand, ["rid_a", "rid_b"], join_type="inner").sort_by("i")
    i = hit["i"].to_numpy()
    edges = _edges(records, found.a[i], found.b[i], "", found.distance[i])
    return edges.set_column(4, "channel", hit["channel_min"])
