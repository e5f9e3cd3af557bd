"""Hash near-duplicate dedup partitioned over Ray: no process holds the pool.

The same decision as `dedup.find_near_duplicates`, reached by a shuffle over bucketed
Parquet parts under a scratch folder:

1. exact pass. A map task per input part writes each record to bucket hash(record) mod
   `exact_buckets`. A reduce task per bucket keeps one record per uid, links records equal
   in every compared column to the first of them (edges of distance 0, channel `exact`),
   and passes the first ones on (`reps/`): a pool of a thousand blank images sends one.
2. chunk pass. For every code `dedup.candidate_codes` names (one per column, at the largest
   radius R of its channels) the code is cut into m >= R+1 chunks: two codes within R bits
   agree exactly on at least one chunk (pigeonhole). A map task per `reps/` part sends each
   record's key (its id, its home part and the code: ~60 B, not the record) once per chunk
   k to bucket hash(column, k, chunk value) mod `buckets`; a column with variants (the
   equalised channel's clipped codes) sends each of a record's codes. A reduce task per
   bucket takes, per (column, k), the pairs of codes agreeing on chunk k and on no earlier
   chunk (so a pair is seen in one bucket only), within R bits, one of them a record's own
   `column` code (as dedup: two variants are no candidate), and asks the records' home parts
   for them.
3. fetch and verify. A task per `reps/` part sends the asked-for records to each bucket; a
   task per bucket runs `dedup.table_edges` on them, in input order (the single-process
   check, all channels: a new per-pair check applies here unchanged), and keeps the edges
   that are its candidates (`edges/`: uid_a, uid_b, pixels, channel, distance).
4. components (`scale.components`) over the edge partitions, then one row per
   non-representative uid, sorted by uid: `DUPLICATES_SCHEMA`, equal to the single process.

Why the output is equal: every pair the single process links is within its channel's
radius on its code, so both records meet in the bucket of their first common chunk, where
the same verification runs on them; verification looks at the two records only, and
`dedup.resolve`'s representative (most pixels, then smallest uid) and distance (smallest
pHash distance over a node's edges) depend only on the edges. One caveat: rows dedup treats as
identical (its collapse: equal hashes and aspect bucket, not equal size) are matched through
the first of them in input order; records are ordered by (part, row), which is the single
process's order when parts are in source order, as ingest writes them.

Memory: an exact-pass task holds one input part or one bucket (N / exact_buckets records of
~430 B, `budget.HASH_RECORD_BYTES`); a chunk reduce task holds the keys of its bucket
(N * copies / buckets keys of ~60 B) and their candidate pairs; a verify task holds the
records its candidates touch. Keys are sent once per chunk and code version: sum over codes
of m * (1 + variants), 154 per record with the default config (29 chunks of phash256, 25 of
nphash256 and of each of its 4 clipped codes). The final table (one row per duplicate) is
assembled by one task, not by the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd.curation import dedup, rundir
from lvd.curation.hamming_pairs import candidate_pairs
from lvd.curation.scale.components import ComponentsConfig, _write, components

EDGE_SCHEMA = pa.schema(
    [("uid_a", pa.string()), ("uid_b", pa.string()), ("pixels_a", pa.int64()), ("pixels_b", pa.int64()),
     ("channel", pa.string()), ("distance", pa.float64())]
)  # fmt: skip
METHOD = "phash"  # the method name dedup.near_duplicate_edges gives its edges
_NOT_COMPARED = rundir.NOT_FOR_DEDUP | {"status", "source", "detail"}
_RID = "_rid"  # (input part << 32) | row: the input order, and a record's id in the shuffle
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, kw_only=True)
class ShuffleConfig:
    """Sizes of the shuffle (`budget.hash_bucket_count` gives them from a memory budget)."""

    buckets: int = 16  # B: buckets of the chunk pass; a reduce task holds ~N * copies / B keys
    exact_buckets: int = 8  # buckets of the exact pass; a reduce task holds ~N / exact_buckets records
    partitions: int = 8  # node partitions of the connected components
    brute_group: int = 512  # rows sharing a chunk compared all-pairs up to this many, else indexed
    task_options: dict = field(default_factory=dict)  # Ray options of every task (budget.ray_options)

    def __post_init__(self):
        for name in ("buckets", "exact_buckets", "partitions", "brute_group"):
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
    """A code column the chunk pass buckets on: its largest radius, its chunks' bit ranges."""

    column: str
    radius: int
    channels: str  # dedup channel names searched on this column, '+'-joined
    bounds: tuple[int, ...]  # chunk k covers bits bounds[k]:bounds[k+1]
    # a column of more codes per row, each searched against the others' `column` code
    # (dedup.CandidateCode.variants); a record is sent once per chunk of each of its codes
    variants: str | None = None


@dataclass(frozen=True)
class HashDedupReport:
    duplicates: Path  # DUPLICATES_SCHEMA rows, sorted by uid
    records: int  # input records compared (accepted, one per uid)
    copies: int  # chunk-pass keys sent (records x chunks x code versions)
    edges: int
    phases: int  # star steps of the components


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
    """The chunking of each column `dedup.candidate_codes` searches (largest radius per column)."""
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
        nbits = nbits_of[column]
        m = max(radius[column] + 1, math.ceil(nbits / 64))  # chunk values fit one uint64
        bounds = tuple(k * nbits // m for k in range(m + 1))
        out.append(Code(column, radius[column], "+".join(names[column]), bounds, variants[column]))
    return out


def partitioned_duplicates(
    sources: list[Source], cfg: dedup.DedupConfig, work_dir: Path, shuffle: ShuffleConfig = ShuffleConfig()
) -> HashDedupReport:
    """`dedup.find_near_duplicates` of the sources' records, partitioned (module doc); leaves
    the table in `work_dir/duplicates.parquet`. Needs a running Ray."""
    work = Path(work_dir)
    opts = {"num_cpus": 1, "max_retries": 3, **shuffle.task_options}
    E, B = shuffle.exact_buckets, shuffle.buckets
    _wave(_exact_map, [(s, i, str(work), E) for i, s in enumerate(sources)], opts)
    records = sum(_wave(_exact_reduce, [(str(work), e) for e in range(E)], opts))
    codes = codes_of(cfg, _code_bits(work))
    copies = sum(_wave(_chunk_map, [(str(work), e, codes, B) for e in range(E)], opts))
    _wave(_chunk_reduce, [(str(work), b, codes, E, shuffle.brute_group) for b in range(B)], opts)
    _wave(_fetch, [(str(work), e) for e in range(E)], opts)
    edges = sum(_wave(_verify, [(str(work), b, cfg) for b in range(B)], opts))
    files = sorted((work / "edges").glob("*.parquet"))
    comp_cfg = ComponentsConfig(partitions=shuffle.partitions, task_options=shuffle.task_options)
    comps = components(files, work / "components", comp_cfg)
    out = work / "duplicates.parquet"
    ray.get(ray.remote(_assemble).options(**opts).remote([str(p) for p in comps.outputs], str(out)))
    return HashDedupReport(duplicates=out, records=records, copies=copies, edges=edges, phases=comps.phases)


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


# ---------------------------------------------------------------- reading and keys


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


def _versions(table: pa.Table, code: Code) -> np.ndarray:
    """uint64 [n, 1 + V, w]: each record's `code.column` code, then its V variant codes."""
    plain = _code_words(table, code.column)
    if code.variants is None:
        return plain[:, None]
    more = _code_words(table, code.variants)
    if more.shape[1] % plain.shape[1]:
        raise ValueError(f"column {code.variants!r} must hold whole codes of {code.column!r}'s width")
    more = more.reshape(len(plain), more.shape[1] // plain.shape[1], plain.shape[1])
    return np.concatenate([plain[:, None], more], axis=1)


def _chunk_values(words: np.ndarray, bounds: tuple[int, ...]) -> np.ndarray:
    """uint64 [n, m]: the value of each chunk (bits bounds[k]:bounds[k+1], little-endian)."""
    raw = np.ascontiguousarray(words).view(np.uint8)
    out = np.zeros((len(words), len(bounds) - 1), np.uint64)
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        bits = np.unpackbits(raw[:, lo // 8 : (hi + 7) // 8], axis=1, bitorder="little")
        packed = np.zeros((len(words), 8), np.uint8)
        chunk = np.packbits(bits[:, lo % 8 : lo % 8 + hi - lo], axis=1, bitorder="little")
        packed[:, : chunk.shape[1]] = chunk
        out[:, k] = packed.view(np.uint64).ravel()
    return out


def _code_bits(work: Path) -> dict[str, int]:
    """Bits of every fixed-width column of the records (from one reps part's schema)."""
    schema = pq.read_schema(next((work / "reps").glob("*.parquet")))
    out = {}
    for f in schema:
        if pa.types.is_fixed_size_binary(f.type):
            out[f.name] = 8 * f.type.byte_width
        elif pa.types.is_integer(f.type):
            out[f.name] = f.type.bit_width
    return out


# ---------------------------------------------------------------- exact pass


def _exact_map(source: Source, index: int, work: str, E: int) -> int:
    t = read_source(source)
    _check(t, source.path)
    t = t.append_column(_RID, pa.array((np.int64(index) << 32) + np.arange(t.num_rows, dtype=np.int64)))
    bucket = (_hash_rows(_row_bytes(t, _compared(t))) % np.uint64(E)).astype(np.int64)
    for e in range(E):
        _write(t.take(np.flatnonzero(bucket == e)), Path(work) / "exact" / f"b{e}" / f"s{index}.parquet")
    return t.num_rows


def _exact_reduce(work: str, e: int) -> int:
    """One record per uid; records equal in every compared column chain to the first.
    Returns the bucket's number of uids."""
    files = sorted((Path(work) / "exact" / f"b{e}").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]).sort_by(_RID)
    uids = t["uid"].to_numpy(zero_copy_only=False)
    _, first_of_uid = np.unique(uids, return_index=True)
    t = t.take(np.sort(first_of_uid))
    data = _row_bytes(t, _compared(t))
    _, first, group = np.unique(data.view(np.dtype((np.void, data.shape[1]))).ravel(), return_index=True, return_inverse=True)  # fmt: skip
    group = group.ravel()
    members = np.flatnonzero(~np.isin(np.arange(t.num_rows), first))
    _write(_edges(t, first[group[members]], members, "exact", np.zeros(len(members))), Path(work) / "edges" / f"exact-{e}.parquet")  # fmt: skip
    _write(t.take(np.sort(first)), Path(work) / "reps" / f"e{e}.parquet")
    return t.num_rows


def _edges(t: pa.Table, a: np.ndarray, b: np.ndarray, channel: str, distance: np.ndarray) -> pa.Table:
    pixels = t["width"].to_numpy().astype(np.int64) * t["height"].to_numpy().astype(np.int64)
    uid = t["uid"]
    return pa.table(
        {"uid_a": uid.take(a), "uid_b": uid.take(b), "pixels_a": pixels[a], "pixels_b": pixels[b],
         "channel": pa.array([channel] * len(a), pa.string()), "distance": np.asarray(distance, np.float64)},
        schema=EDGE_SCHEMA,
    )  # fmt: skip


# ---------------------------------------------------------------- chunk pass


def _chunk_map(work: str, e: int, codes: list[Code], B: int) -> int:
    """Each record's key once per (code, chunk, code version), to bucket hash(code, chunk,
    value) mod B: its id, its home part, and the code of that version (not the record)."""
    t = pq.read_table(Path(work) / "reps" / f"e{e}.parquet")
    if t.num_rows == 0:
        return 0
    rids, keys, units, which, buckets = [], [], [], [], []
    unit = 0
    for ci, code in enumerate(codes):
        versions = _versions(t, code)
        values = [_chunk_values(np.ascontiguousarray(versions[:, j]), code.bounds) for j in range(versions.shape[1])]
        for k in range(len(code.bounds) - 1):
            for j, vals in enumerate(values):
                h = _mix(vals[:, k] ^ _mix(np.uint64(ci << 16 | k)))
                rids.append(t[_RID].to_numpy())
                keys.append(versions[:, j])
                units.append(np.full(t.num_rows, unit, np.int32))
                which.append(np.full(t.num_rows, j, np.int8))
                buckets.append((h % np.uint64(B)).astype(np.int64))
            unit += 1
    buckets = np.concatenate(buckets)
    table = pa.table({
        _RID: np.concatenate(rids), "_unit": np.concatenate(units), "_which": np.concatenate(which),
        "_home": np.full(len(buckets), e, np.int32), "_code": _binary_rows(keys),
    })  # fmt: skip
    for b in range(B):
        _write(table.take(np.flatnonzero(buckets == b)), Path(work) / "chunks" / f"b{b}" / f"e{e}.parquet")
    return len(buckets)


def _binary_rows(blocks: list[np.ndarray]) -> pa.Array:
    """A binary array with one value per row of each uint64 [n_i, w_i] block, in order."""
    widths = np.concatenate([np.full(len(x), 8 * x.shape[1], np.int64) for x in blocks])
    offsets = np.r_[0, np.cumsum(widths)].astype(np.int64)
    data = b"".join(np.ascontiguousarray(x).tobytes() for x in blocks)
    return pa.Array.from_buffers(pa.large_binary(), len(widths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _units(codes: list[Code]) -> list[tuple[Code, int]]:
    return [(code, k) for code in codes for k in range(len(code.bounds) - 1)]


PAIR_SCHEMA = pa.schema([("rid_a", pa.int64()), ("rid_b", pa.int64()), ("channel", pa.string())])


def _chunk_reduce(work: str, b: int, codes: list[Code], E: int, brute_group: int) -> None:
    """Candidate record pairs of bucket b (every unit), and requests for their records."""
    files = sorted((Path(work) / "chunks" / f"b{b}").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    parts = []
    units = t["_unit"].to_numpy() if t is not None else np.zeros(0, np.int32)
    for u, (code, k) in enumerate(_units(codes)):
        sub = t.filter(pa.array(units == u)) if t is not None else None
        if sub is not None and sub.num_rows > 1:
            ra, rb = _unit_pairs(sub.sort_by([(_RID, "ascending"), ("_which", "ascending")]), code, k, brute_group)
            parts.append(pa.table({"rid_a": ra, "rid_b": rb, "channel": [code.channels] * len(ra)}, schema=PAIR_SCHEMA))
    pairs = pa.concat_tables(parts) if parts else PAIR_SCHEMA.empty_table()
    _write(pairs, Path(work) / "pairs" / f"b{b}.parquet")
    touched = np.unique(np.concatenate([pairs["rid_a"].to_numpy(), pairs["rid_b"].to_numpy()]))
    home = t.select([_RID, "_home"]).group_by(_RID).aggregate([("_home", "min")]) if t is not None else None
    if home is not None and len(touched):
        home = home.filter(pc.is_in(home[_RID], pa.array(touched)))
        where = home["_home_min"].to_numpy()
        for e in range(E):
            ask = home[_RID].to_numpy()[where == e]
            if len(ask):
                _write(pa.table({_RID: ask}), Path(work) / "requests" / f"e{e}" / f"b{b}.parquet")


def _fetch(work: str, e: int) -> None:
    """Send the records of part e that buckets asked for (whole records, once per bucket)."""
    asks = sorted((Path(work) / "requests" / f"e{e}").glob("*.parquet"))
    if not asks:
        return
    t = pq.read_table(Path(work) / "reps" / f"e{e}.parquet")
    for f in asks:
        rows = t.filter(pc.is_in(t[_RID], pq.read_table(f)[_RID]))
        _write(rows, Path(work) / "fetched" / f.stem / f"e{e}.parquet")


def _verify(work: str, b: int, cfg: dedup.DedupConfig) -> int:
    """Bucket b's candidate pairs checked by dedup.table_edges on the records they touch, in
    input order; edges that are candidates here are written (the others' bucket has them)."""
    pairs = pq.read_table(Path(work) / "pairs" / f"b{b}.parquet")
    files = sorted((Path(work) / "fetched" / f"b{b}").glob("*.parquet"))
    if pairs.num_rows == 0 or not files:
        _write(EDGE_SCHEMA.empty_table(), Path(work) / "edges" / f"b{b}.parquet")
        return 0
    records = pa.concat_tables([pq.read_table(f) for f in files]).sort_by(_RID)
    found = dedup.table_edges(records, cfg)
    rid = records[_RID].to_numpy()
    cand = pairs.group_by(["rid_a", "rid_b"]).aggregate([("channel", "min")])
    got = pa.table({"rid_a": rid[found.a], "rid_b": rid[found.b], "i": np.arange(len(found))})
    hit = got.join(cand, ["rid_a", "rid_b"], join_type="inner").sort_by("i")
    i = hit["i"].to_numpy()
    pos_a, pos_b = found.a[i], found.b[i]
    edges = _edges(records, pos_a, pos_b, "", found.distance[i]).set_column(4, "channel", hit["channel_min"])
    _write(edges, Path(work) / "edges" / f"b{b}.parquet")
    return edges.num_rows


def _unit_pairs(sub: pa.Table, code: Code, k: int, brute_group: int) -> tuple[np.ndarray, np.ndarray]:
    """Record pairs (rid_a < rid_b) of one (code, chunk k) in one bucket: pairs of codes (one
    of them a record's `code.column` code) that agree on chunk k, on no earlier chunk, and are
    within the radius."""
    which = sub["_which"].to_numpy()
    rec = sub[_RID].to_numpy()
    words = _binary_words(sub["_code"])
    key = _chunk_values(words, code.bounds[k : k + 2])[:, 0]
    a, b = _same_chunk_pairs(key, words, code.radius, brute_group)
    keep = (rec[a] != rec[b]) & ((which[a] == 0) | (which[b] == 0))
    a, b = a[keep], b[keep]
    keep = _ours(a, b, words, key, code.bounds[: k + 1], code.radius)
    ra, rb = rec[a[keep]], rec[b[keep]]
    pairs = np.unique(np.stack([np.minimum(ra, rb), np.maximum(ra, rb)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _binary_words(col: pa.ChunkedArray) -> np.ndarray:
    """uint64 [n, w] from a binary column of equal-length codes."""
    arr = col.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return data.view(np.uint64).reshape(len(arr), -1)


def _ours(a, b, words, key, earlier: tuple[int, ...], radius: int) -> np.ndarray:
    """Pairs this unit answers for: agreeing on its chunk (`key`), within radius, and on no
    earlier chunk (bounds `earlier`). Cheapest test first, each on the survivors of the last."""
    ok = key[a] == key[b]
    idx = np.flatnonzero(ok)
    dist = np.zeros(len(idx), np.int64)
    for w in range(words.shape[1]):  # word by word: no [pairs, words] temporaries
        col = words[:, w]
        dist += np.bitwise_count(col[a[idx]] ^ col[b[idx]])
    idx = idx[dist <= radius]
    ok[:] = False
    ok[idx] = (_chunk_values(words[a[idx]], earlier) != _chunk_values(words[b[idx]], earlier)).all(axis=1)
    return ok


def _same_chunk_pairs(key: np.ndarray, words: np.ndarray, radius: int, brute_group: int):
    """Pairs (i < j) of rows with equal `key`: all of them in groups up to `brute_group`
    rows, those within `radius` bits (hamming_pairs.candidate_pairs) in bigger ones."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[starts, len(sk)])
    parts_a, parts_b = [], []
    small = np.repeat(sizes <= brute_group, sizes)
    so, sks = order[small], sk[small]
    step = 1
    pos = np.flatnonzero(sks[1:] == sks[:-1]) if len(sks) > 1 else np.zeros(0, np.int64)
    while len(pos):
        parts_a.append(so[pos])
        parts_b.append(so[pos + step])
        step += 1
        pos = pos[pos + step < len(sks)]
        pos = pos[sks[pos + step] == sks[pos]]
    for s, n in zip(starts[sizes > brute_group], sizes[sizes > brute_group]):
        rows = order[s : s + n]
        ga, gb = candidate_pairs(words[rows], radius)
        parts_a.append(rows[ga])
        parts_b.append(rows[gb])
    if not parts_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(parts_a).astype(np.int64), np.concatenate(parts_b).astype(np.int64)
    return np.minimum(a, b), np.maximum(a, b)
