"""Column-sharded store of L2-normalised float16 embeddings beside their uids.

Layout of a vector folder (one pair of files per partition, written by the embed stage):
- `part-NNNNNN.npy`: float16 [n, D], a plain `.npy` so `np.load(mmap_mode="r")` maps it;
- `part-NNNNNN.uids.parquet`: one `uid` string column, row i naming vector row i.
Each file goes to a temp name in the same folder and is renamed (`os.replace`); the uids file
is renamed last, so a part whose uids file exists is complete and `open_vectors` lists parts
by it.

`open_vectors` maps every part (nothing is read until touched), so copy detection, clustering
and retrieval can walk the store in blocks (`VectorStore.blocks`) without holding it in RAM;
only a Faiss index build needs all vectors resident (as float32, twice the bytes below).

Bytes per million images, vectors only (2*D bytes each in float16):
D=192 (ViT-Ti) 384 MB; D=384 (ViT-S) 768 MB; D=768 (ViT-B) 1.54 GB; D=1024 (ViT-L) 2.05 GB;
D=1536 (ViT-g) 3.07 GB. uids add about 64 MB per million on disk (sha256 hex barely
compresses) and 64 MB in RAM (kept as fixed-width bytes, not Python strings).

Precomputed vectors (`lvd curate --vectors DIR`, `scan_given` / `gather_given`): Parquet files
with a key column (`uid`: the image's sha256, or `source`: its ledger source) and a vector
column (`vector` or `embedding`, a list of floats), or `NAME.npy` float [n, D] beside
`NAME.uids.parquet` / `NAME.keys.parquet` (so an lvd vector folder is valid input). The embed
stage (`lvd.curation.stages.embed.run_given`) copies each partition's rows into this store.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_PART = re.compile(r"^part-(\d{6})\.uids\.parquet$")
UIDS_SCHEMA = pa.schema([("uid", pa.string())])


class Embedded(NamedTuple):
    """Vectors and the uids they belong to (row i of `vecs_ND` is image `uids[i]`)."""

    uids: np.ndarray  # object [N] of str
    vecs_ND: np.ndarray  # float16 [N, D], L2-normalised


def part_paths(folder: str | Path, part_index: int) -> tuple[Path, Path]:
    """(vectors .npy, uids .parquet) of one part."""
    stem = Path(folder) / f"part-{part_index:06d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".uids.parquet")


def folder_parts(folder: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """(part .npy paths, their row counts) of a vector folder's complete parts, from the .npy
    headers alone: no uid is read, so planning costs nothing per row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no vector folder (run the embed stage first)")
    indices = sorted(int(m.group(1)) for n in folder.iterdir() if (m := _PART.match(n.name)))
    npys = tuple(str(part_paths(folder, i)[0]) for i in indices)
    return npys, np.array([np.load(p, mmap_mode="r").shape[0] for p in npys], np.int64)


def write_vectors(folder: str | Path, part_index: int, uids, vecs_ND: np.ndarray) -> None:
    """Write one part atomically: vectors first, then the uids file that marks it complete."""
    uids = [str(u) for u in uids]
    vecs_ND = np.asarray(vecs_ND)
    if vecs_ND.dtype != np.float16 or vecs_ND.ndim != 2:
        raise ValueError(
            f"vectors must be float16 [n, D], got {vecs_ND.dtype} {vecs_ND.shape}; cast with .astype(np.float16)"
        )
    if len(uids) != len(vecs_ND):
        raise ValueError(f"{len(uids)} uids for {len(vecs_ND)} vectors: one uid per row")
    if len(set(uids)) != len(uids):
        raise ValueError(f"part {part_index} has repeated uids: embed each unique uid once")
    if not 0 <= part_index < 10**6:
        raise ValueError(f"part_index={part_index}: use 0..999999")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npy, uid_file = part_paths(folder, part_index)
    _atomic(npy, lambda f: np.save(f, np.ascontiguousarray(vecs_ND), allow_pickle=False))
    table = pa.table({"uid": pa.array(uids, pa.string())}, schema=UIDS_SCHEMA)
    _atomic(uid_file, lambda f: pq.write_table(table, f))


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VectorBlock(NamedTuple):
    start: int  # store row of the block's first vector
    uids: np.ndarray  # object [n] of str
    vecs_ND: np.ndarray  # float16 [n, D] (a view into the memory map where possible)


@dataclass(frozen=True)
class _Part:
    index: int
    vecs_ND: np.ndarray  # float16 memory map
    uids: np.ndarray  # bytes [n] (fixed width)


class VectorStore:
    """All parts of a vector folder, memory-mapped, in part order; rows numbered across parts."""

    def __init__(self, parts: list[_Part]):
        self._parts = parts
        dims = {p.vecs_ND.shape[1] for p in parts if len(p.vecs_ND)} or {p.vecs_ND.shape[1] for p in parts}
        if len(dims) > 1:
            raise ValueError(f"parts have different dimensions {sorted(dims)}: one folder per backbone")
        self.dim = dims.pop() if dims else 0
        self._offsets = np.cumsum([0] + [len(p.uids) for p in parts])
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted uids, their rows)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def part_indices(self) -> list[int]:
        return [p.index for p in self._parts]

    @property
    def uids(self) -> np.ndarray:
        """object [N] of str, in store order."""
        return _strings(np.concatenate([p.uids for p in self._parts])) if self._parts else np.zeros(0, object)

    def rows(self, uids) -> np.ndarray:
        """Store rows (int64) of `uids`; KeyError naming the first unknown one."""
        if self._lookup is None:
            allb = np.concatenate([p.uids for p in self._parts]) if self._parts else np.zeros(0, "S1")
            order = np.argsort(allb, kind="stable")
            self._lookup = (allb[order], order)
        sorted_uids, order = self._lookup
        want = np.asarray([str(u).encode() for u in uids], dtype=sorted_uids.dtype if len(sorted_uids) else "S1")
        pos = np.clip(np.searchsorted(sorted_uids, want), 0, max(len(sorted_uids) - 1, 0))
        found = (sorted_uids[pos] == want) if len(sorted_uids) else np.zeros(len(want), bool)
        # fixed-width bytes truncate longer strings: compare the originals' lengths too
        found &= np.array([len(str(u).encode()) <= sorted_uids.itemsize for u in uids], bool)
        if not found.all():
            raise KeyError(f"uid {list(uids)[int(np.argmin(found))]!r} is not in the vector store")
        return order[pos].astype(np.int64)

    def get(self, uids) -> np.ndarray:
        """float16 [len(uids), D]: the vectors of `uids`, in the order asked."""
        return self.take(self.rows(uids))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float16 [len(rows), D]: the vectors at store rows `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float16)
        part = np.searchsorted(self._offsets, rows, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._parts[p].vecs_ND[rows[sel] - self._offsets[p]]
        return out

    def blocks(self, block_rows: int = 65_536) -> Iterator[VectorBlock]:
        """Consecutive blocks of at most `block_rows` rows; a block never spans two parts."""
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows}: use a positive number of rows")
        for p, start in zip(self._parts, self._offsets[:-1]):
            for s in range(0, len(p.uids), block_rows):
                sl = slice(s, s + block_rows)
                yield VectorBlock(int(start + s), _strings(p.uids[sl]), p.vecs_ND[sl])

    def load(self) -> Embedded:
        """Everything in RAM (for an index build): uids and float16 [N, D]."""
        return Embedded(self.uids, self.take(np.arange(len(self))))


def _strings(b: np.ndarray) -> np.ndarray:
    return np.array([x.decode() for x in b.tolist()], dtype=object)


def open_vectors(folder: str | Path) -> VectorStore:
    """Memory-map every complete part of `folder` (sorted by part index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no vector folder (run the embed stage first)")
    parts = []
    for name in sorted(n for n in os.listdir(folder) if _PART.match(n)):
        index = int(_PART.match(name).group(1))
        npy, uid_file = part_paths(folder, index)
        vecs = np.load(npy, mmap_mode="r", allow_pickle=False)
        uids = pq.read_table(uid_file, columns=["uid"])["uid"].to_pylist()
        if vecs.dtype != np.float16 or vecs.ndim != 2 or len(vecs) != len(uids):
            raise ValueError(f"{npy}: {vecs.dtype} {vecs.shape} does not match {len(uids)} uids as float16 [n, D]")
        parts.append(_Part(index, vecs, np.array([u.encode() for u in uids], dtype=f"S{_width(uids)}")))
    return VectorStore(parts)


def _width(uids: list[str]) -> int:
    return max([len(u.encode()) for u in uids], default=1) or 1


# ---------------------------------------------------------------- precomputed vectors (--vectors DIR)

KEY_COLUMNS = ("uid", "source")  # what a given vector is keyed by: the image's uid or its ledger source
VECTOR_COLUMNS = ("vector", "embedding")
UNIT_TOLERANCE = 1e-2  # a norm within 1% of 1 is taken as normalised (fp16 rounding); others are L2-normalised


@dataclass(frozen=True)
class GivenFile:
    """One file of a precomputed-vectors folder: a Parquet part (keys and a vector column) or a
    float `.npy` [n, D] with its keys beside it (`NAME.uids.parquet` or `NAME.keys.parquet`)."""

    path: str  # the vectors: .parquet or .npy
    keys: str  # the Parquet file holding the key column (the same file for a Parquet part)
    column: str  # the vector column of a Parquet part; "" for .npy


@dataclass(frozen=True)
class GivenVectors:
    """A precomputed-vectors folder, checked once: every file keyed the same way, one dimension."""

    folder: str
    key: str  # "uid" or "source"
    dim: int
    files: tuple[GivenFile, ...]
    identity: str  # names, sizes and mtimes of the files: a changed folder re-imports


class GivenVectorsError(ValueError):
    """Precomputed vectors that cannot stand in for the embedder (the message says why and what to do)."""


def scan_given(folder: str | Path) -> GivenVectors:
    """Check a precomputed-vectors folder's layout: files, key column, dimension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GivenVectorsError(f"--vectors {folder}: not a folder")
    files = [_given_npy(p) for p in sorted(folder.glob("*.npy"))]
    key_files = {f.keys for f in files}
    files += [_given_parquet(p) for p in sorted(folder.glob("*.parquet")) if str(p) not in key_files]
    if not files:
        raise GivenVectorsError(
            f"--vectors {folder}: no vectors found; give Parquet files with a key column ({' or '.join(KEY_COLUMNS)}) "
            f"and a vector column ({' or '.join(VECTOR_COLUMNS)}), or NAME.npy float [n, D] beside NAME.uids.parquet"
        )
    keys = {_key_column(f.keys) for f in files}
    if len(keys) > 1:
        raise GivenVectorsError(f"--vectors {folder}: some files are keyed by uid, others by source: use one key")
    dims = {_dim(f) for f in files}
    if len(dims) > 1:
        raise GivenVectorsError(
            f"--vectors {folder}: files have different dimensions {sorted(dims)}: one model's vectors"
        )
    identity = [(Path(f.path).name, Path(f.path).stat().st_size, Path(f.path).stat().st_mtime_ns) for f in files]
    identity += [(Path(f.keys).name, Path(f.keys).stat().st_mtime_ns) for f in files]
    return GivenVectors(str(folder), keys.pop(), dims.pop(), tuple(files), json.dumps(identity))


def _given_npy(path: Path) -> GivenFile:
    for suffix in (".uids.parquet", ".keys.parquet"):
        if (keys := path.with_suffix(suffix)).exists():
            return GivenFile(str(path), str(keys), "")
    raise GivenVectorsError(
        f"{path}: no keys beside it: write its row keys to {path.with_suffix('.uids.parquet').name}"
    )


def _given_parquet(path: Path) -> GivenFile:
    names = pq.read_schema(path).names
    column = next((c for c in VECTOR_COLUMNS if c in names), None)
    if column is None:
        raise GivenVectorsError(f"{path}: no vector column ({' or '.join(VECTOR_COLUMNS)}); columns: {names}")
    return GivenFile(str(path), str(path), column)


def _key_column(path: str) -> str:
    names = pq.read_schema(path).names
    found = [c for c in KEY_COLUMNS if c in names]
    if len(found) != 1:
        raise GivenVectorsError(f"{path}: needs exactly one key column, uid or source; columns: {names}")
    return found[0]


def _dim(f: GivenFile) -> int:
    if not f.column:
        arr = np.load(f.path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise GivenVectorsError(f"{f.path}: {arr.dtype} {arr.shape}: give float vectors [n, D]")
        return int(arr.shape[1])
    t = pq.ParquetFile(f.path)
    kind = t.schema_arrow.field(f.column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise GivenVectorsError(f"{f.path}: column {f.column!r} is {kind}: give a list of floats per row")
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    for batch in t.iter_batches(batch_size=1, columns=[f.column]):
        return len(batch.column(0)[0].as_py() or [])
    return 0


def gather_given(given: GivenVectors, keys: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """The rows of `keys` in the folder: (keys found, float32 [m, D] in that order, keys found
    more than once). Reads each file's key column, then only the row groups holding a match."""
    want = pa.array(sorted(set(keys)), pa.string())
    found: list[str] = []
    blocks: list[np.ndarray] = []
    for f in given.files:
        col = pq.read_table(f.keys, columns=[given.key])[given.key]
        rows = np.flatnonzero(pc.is_in(col, value_set=want).to_numpy(zero_copy_only=False))
        if len(rows):
            found += col.take(pa.array(rows)).to_pylist()
            blocks.append(_rows(f, rows, given.dim))
    counts: dict[str, int] = {}
    for k in found:
        counts[k] = counts.get(k, 0) + 1
    vecs = np.concatenate(blocks) if blocks else np.zeros((0, given.dim), np.float32)
    return found, vecs, sorted(k for k, n in counts.items() if n > 1)


def _rows(f: GivenFile, rows: np.ndarray, dim: int) -> np.ndarray:
    """float32 [len(rows), D]: rows of one file (a memory map for .npy; whole row groups for Parquet)."""
    if not f.column:
        return np.asarray(np.load(f.path, mmap_mode="r", allow_pickle=False)[rows], np.float32)
    pf = pq.ParquetFile(f.path)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    sizes = starts[groups + 1] - starts[groups]
    first = dict(zip(groups.tolist(), np.cumsum([0, *sizes[:-1]]).tolist()))  # row group -> its first row read
    local = np.array([first[g] for g in group_of.tolist()], np.int64) + (rows - starts[group_of])
    col = pf.read_row_groups(groups.tolist(), columns=[f.column])[f.column].combine_chunks()
    col = col.take(pa.array(local, pa.int64()))
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != dim).any():
        raise GivenVectorsError(f"{f.path}: rows with {sorted(set(lengths.tolist()) - {dim})} values, not {dim}")
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(rows), dim)


def to_unit_fp16(vecs_ND: np.ndarray) -> tuple[np.ndarray, int]:
    """float16 [n, D] L2-normalised, and how many rows had to be normalised (those within
    `UNIT_TOLERANCE` of unit length are stored as given). Rows must be finite and non-zero."""
    x = np.asarray(vecs_ND, np.float32)
    norms = np.linalg.norm(x, axis=1)
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    x[off] /= norms[off, None]
    return x.astype(np.float16), int(off.sum())
