"""A synthetic pool of any size, written part by part as a run folder the global stages read.

For the scale benchmark (benchmarks/curate_scale.py) and the multi-node / fault / memory tests:
10^7 images cannot be decoded on a laptop, but the global stages never see pixels, only what
ingest and embed wrote. So this writes that directly:
- `RUN/ingest/part-N.parquet` (INGEST_SCHEMA, every row accepted, with phash, dhash, phash256,
  nphash256 and thumb16), `part-N.blobs.parquet` (one empty blob per uid) and the runner's
  done-marker, as `lvd curate`'s ingest would leave them;
- `RUN/vectors/part-N.npy` + `part-N.uids.parquet` (float16 [n, D], unit norm) as embed would.

Every value is a pure function of (seed, row index) (splitmix64 counters), so a part is written
without the others in memory and the driver's peak is one part. Every `copy_every`-th row is a
near-copy of an earlier row anywhere in the pool (a few hash bits flipped, the thumbnail
shifted by +-2 gray levels, the vector moved by 1e-2): dedup has cross-partition groups and
chains (a copy of a copy) to find. Vectors are a mixture of `centres` Gaussian-like clusters,
so k-means has structure to find.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvd.curation import rundir, runner
from lvd.curation.ingest import BLOB_SCHEMA, INGEST_SCHEMA
from lvd.curation.vectors import write_vectors

_M = np.uint64(0xFFFFFFFFFFFFFFFF)
CLIPPED_WORDS = INGEST_SCHEMA.field("cphash256").type.byte_width // 8  # uint64 words of the clipped codes


@dataclass(frozen=True, kw_only=True)
class PoolSpec:
    n: int
    dim: int = 128
    part_rows: int = 25_000
    copy_every: int = 50  # every 50th row copies an earlier one (2% near-duplicates)
    centres: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.n < 2 or self.part_rows < 1 or self.dim < 2 or self.copy_every < 2:
            raise ValueError(f"{self}: need n >= 2, part_rows >= 1, dim >= 2, copy_every >= 2")

    @property
    def parts(self) -> int:
        return math.ceil(self.n / self.part_rows)

    def rows(self, part: int) -> np.ndarray:
        return np.arange(part * self.part_rows, min(self.n, (part + 1) * self.part_rows), dtype=np.uint64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise over uint64 (a counter-based random stream)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        return z ^ (z >> np.uint64(31))


def _stream(spec: PoolSpec, rows: np.ndarray, field: int, width: int) -> np.ndarray:
    """uint64 [len(rows), width] random words for (seed, field, row, word)."""
    base = splitmix64(rows * np.uint64(1024) + np.uint64(field * 64 + spec.seed * 7919))
    return splitmix64(base[:, None] ^ (np.arange(width, dtype=np.uint64)[None, :] * np.uint64(0x9E37)))


def copied_row(spec: PoolSpec, rows: np.ndarray) -> np.ndarray:
    """The row each row copies (itself for an original): an earlier row, anywhere in the pool,
    possibly a copy itself (chains)."""
    src = rows.copy()
    copy = (rows % np.uint64(spec.copy_every) == np.uint64(spec.copy_every - 1)) & (rows > 0)
    src[copy] = _stream(spec, rows[copy], 9, 1)[:, 0] % rows[copy]
    return src


def source_of(spec: PoolSpec, rows: np.ndarray) -> np.ndarray:
    """The original each row's content comes from (its copy chain's root; itself if original)."""
    root = copied_row(spec, rows)
    while True:
        nxt = copied_row(spec, root)
        if (nxt == root).all():
            return root
        root = nxt


def uid_of(spec: PoolSpec, row: int) -> str:
    return hashlib.sha256(f"lvd-synthetic-{spec.seed}-{row}".encode()).hexdigest()


def records(spec: PoolSpec, part: int) -> pa.Table:
    """INGEST_SCHEMA rows of one part; copies carry their source's hashes, a few bits flipped."""
    rows = spec.rows(part)
    src, n = source_of(spec, rows), len(rows)
    copy = src != rows
    flip = np.where(copy, np.uint64(1) << (rows % np.uint64(64)), np.uint64(0))
    phash, dhash = _stream(spec, src, 1, 1)[:, 0] ^ flip, _stream(spec, src, 2, 1)[:, 0] ^ flip
    p256 = _stream(spec, src, 3, 4).view(np.uint8).reshape(n, 32).copy()
    n256 = _stream(spec, src, 4, 4).view(np.uint8).reshape(n, 32).copy()
    p256[copy, 0] ^= 1
    thumb = (_stream(spec, src, 5, 32).view(np.uint8).reshape(n, 256) // 2 + 64).astype(np.int16)
    thumb[copy] += (_stream(spec, rows[copy], 6, 32).view(np.uint8).reshape(-1, 256) % 5).astype(np.int16) - 2
    width = (160 + _stream(spec, src, 7, 1)[:, 0] % 200).astype(np.int32)
    cols = {
        "source": [f"synthetic/{r:09d}.jpg" for r in rows.tolist()],
        "status": ["accepted"] * n,
        "reason": [None] * n,
        "uid": [uid_of(spec, r) for r in rows.tolist()],
        "format": ["JPEG"] * n,
        "width": width,
        "height": np.full(n, 240, np.int32),
        "nbytes": np.full(n, 20_000, np.int64),
        "phash": phash,
        "dhash": dhash,
        "phash256": _fixed(p256),
        "thumb16": _fixed(thumb.astype(np.uint8)),
        "nphash256": _fixed(n256),
        "cphash256": _fixed(_stream(spec, src, 8, CLIPPED_WORDS).view(np.uint8).reshape(n, 8 * CLIPPED_WORDS)),
        "sat16": _fixed(np.zeros((n, 64), np.uint8)),  # no clipped cell
        "meta": [None] * n,
        "detail": [None] * n,
    }
    for f in INGEST_SCHEMA:  # columns ingest gained since: codes copy their source's, masks are empty
        if f.name not in cols:
            cols[f.name] = _other_column(spec, f, src) if pa.types.is_fixed_size_binary(f.type) else [None] * n
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in INGEST_SCHEMA}, schema=INGEST_SCHEMA)


def _other_column(spec: PoolSpec, f: pa.Field, src: np.ndarray) -> pa.Array:
    width = f.type.byte_width
    if "sat" in f.name:  # a mask of clipped cells: none
        return _fixed(np.zeros((len(src), width), np.uint8))
    key = 100 + zlib.crc32(f.name.encode()) % 1000
    words = _stream(spec, src, key, math.ceil(width / 8)).view(np.uint8).reshape(len(src), -1)
    return _fixed(np.ascontiguousarray(words[:, :width]))


def _fixed(a_NB: np.ndarray) -> pa.Array:
    width = a_NB.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(a_NB), [None, pa.py_buffer(a_NB.tobytes())])


def vectors(spec: PoolSpec, part: int) -> np.ndarray:
    """float16 [n, D] unit vectors: a centre + 0.35 * noise of the original (copies: moved by 1e-2)."""
    rows = spec.rows(part)
    src = source_of(spec, rows)
    copy = np.flatnonzero(src != rows)
    centres = _noise(spec, 0, spec.centres, key=1)
    noise = _noise(spec, int(rows[0]), len(rows), key=2)
    for i in copy:  # an original's noise, from its own place in the stream
        noise[i] = _noise(spec, int(src[i]), 1, key=2)[0] + 0.03 * _noise(spec, int(rows[i]), 1, key=3)[0]
    x = centres[_stream(spec, src, 10, 1)[:, 0] % np.uint64(spec.centres)] + 0.35 * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _noise(spec: PoolSpec, first_row: int, n: int, *, key: int) -> np.ndarray:
    """float32 [n, D] uniform noise of unit variance for rows first_row.. of stream `key`:
    a Philox counter advanced to the row, so any row is reached without the rows before it."""
    words = 4 * math.ceil(spec.dim / 4)  # Philox advances in steps of 4 words
    gen = np.random.Philox(key=spec.seed * 1000 + key)
    gen.advance(first_row * words // 4)
    raw = gen.random_raw(n * words).reshape(n, words)[:, : spec.dim]
    return ((raw >> np.uint64(40)).astype(np.float32) / float(1 << 24) - 0.5) * math.sqrt(12)


@dataclass(frozen=True)
class _Part:
    index: int
    fingerprint: str


def write_pool(spec: PoolSpec, run_dir: Path, *, vectors_too: bool = True) -> Path:
    """Write the pool into `run_dir` (ingest parts with markers, vector parts); a part already
    written (marker present, vectors present) is kept, so a second call is cheap."""
    run_dir = Path(run_dir)
    ingest_dir, vec_dir = rundir.stage_dir(run_dir, "ingest"), rundir.vectors_dir(run_dir)
    ingest_dir.mkdir(parents=True, exist_ok=True)
    # a new ingest column, or a column's new width (cphash256 grew from 4 to 7 clipped codes),
    # rewrites the pool: the schema's text names both
    cfg = runner.config_hash(spec, INGEST_SCHEMA.to_string(show_schema_metadata=False))
    for part in range(spec.parts):
        unit = _Part(part, f"synthetic-{part}")
        if not runner.is_done(ingest_dir, unit, cfg):
            rec = records(spec, part)
            blobs = pa.table(
                {"uid": rec["uid"], "data": pa.array([b""] * len(rec), pa.binary())}, schema=BLOB_SCHEMA
            ).sort_by("uid")
            runner.write_outputs({"": rec, rundir.BLOBS: blobs}, unit, ingest_dir, cfg)
        if vectors_too and not (vec_dir / f"part-{part:06d}.uids.parquet").exists():
            write_vectors(vec_dir, part, [uid_of(spec, r) for r in spec.rows(part).tolist()], vectors(spec, part))
    return run_dir


def expected_duplicates(spec: PoolSpec) -> dict[str, str]:
    """uid of every planted copy -> uid of the original its chain leads to (the group root)."""
    rows = np.arange(spec.n, dtype=np.uint64)
    root = source_of(spec, rows)
    return {uid_of(spec, int(r)): uid_of(spec, int(root[r])) for r in np.flatnonzero(root != rows)}
