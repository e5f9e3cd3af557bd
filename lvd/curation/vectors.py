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
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
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
