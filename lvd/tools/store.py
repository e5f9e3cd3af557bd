"""The `lvd embed` output folder: write it batch by batch, read it back memory-mapped.

OUT/
  embeddings.parquet  `row` int64, `id` string, `path` string, `cls` list<float32> (raw CLS)
  cls.npy             float32 [N, D], row i = embeddings.parquet row i (np.load(mmap_mode="r"))
  patches.npy         float16 [N, h, w, D] patch tokens, registers excluded (with --patches)
  skipped.parquet     `id`, `path`, `reason` of every input that could not be read or decoded
  meta.json           written last: a folder without it is an unfinished run

CLS vectors are stored as the backbone gives them (final norm, not L2-normalised): `lvd index`
normalises them for cosine search, a linear probe may want them raw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.tools.images import ImageRef

META = "meta.json"
SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
_COPY_ROWS = 4096


@dataclass(frozen=True)
class Skipped:
    ref: ImageRef
    reason: str


@dataclass(frozen=True)
class Embeddings:
    """A finished `lvd embed` folder; arrays are read-only memory maps."""

    root: Path
    ids: list[str]
    paths: list[str]
    cls_ND: np.ndarray
    patches_NhwD: np.ndarray | None
    skipped: pa.Table
    meta: dict


class FeatureWriter:
    """Appends rows to `.npy` memory maps sized for `capacity` rows; `close` trims them to the
    rows written (skipped inputs leave fewer) and writes the tables and meta.json last."""

    def __init__(self, out: str | Path, *, capacity: int, dim: int, grid: tuple[int, int] | None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / META).unlink(missing_ok=True)  # unfinished until close()
        self.capacity, self.dim, self.grid = capacity, dim, grid
        self.cls = self._open("cls", (capacity, dim), np.float32)
        self.patches = self._open("patches", (capacity, *grid, dim), np.float16) if grid else None
        self.refs: list[ImageRef] = []
        self.skipped: list[Skipped] = []

    def _open(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.lib.format.open_memmap(self.out / f"{name}.npy.part", mode="w+", dtype=dtype, shape=shape)

    def append(self, refs: list[ImageRef], cls_BD: np.ndarray, patches_BhwD: np.ndarray | None) -> None:
        start, end = len(self.refs), len(self.refs) + len(refs)
        if end > self.capacity:
            raise RuntimeError(f"{end} images but room for {self.capacity}: the input changed while embedding")
        self.cls[start:end] = cls_BD
        if self.patches is not None:
            self.patches[start:end] = patches_BhwD
        self.refs += refs

    def close(self, meta: dict) -> Embeddings:
        n = len(self.refs)
        self._finish("cls", self.cls, n)
        if self.patches is not None:
            self._finish("patches", self.patches, n)
        else:
            (self.out / "patches.npy").unlink(missing_ok=True)
        self._write_tables()
        meta = {
            **meta,
            "count": n,
            "skipped": len(self.skipped),
            "dim": self.dim,
            "grid": list(self.grid) if self.grid else None,
        }
        tmp = self.out / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out / META)
        return load_embeddings(self.out)

    def _finish(self, name: str, part: np.ndarray, n: int) -> None:
        """Rename the memmap, copied into one of exactly n rows when inputs were skipped."""
        part.flush()
        src, dst = self.out / f"{name}.npy.part", self.out / f"{name}.npy"
        if n == len(part):
            os.replace(src, dst)
            return
        final = np.lib.format.open_memmap(dst, mode="w+", dtype=part.dtype, shape=(n, *part.shape[1:]))
        for s in range(0, n, _COPY_ROWS):
            e = min(n, s + _COPY_ROWS)
            final[s:e] = part[s:e]
        final.flush()
        del final
        src.unlink()

    def _write_tables(self) -> None:
        cls = np.load(self.out / "cls.npy", mmap_mode="r")
        schema = pa.schema(
            [("row", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("cls", pa.list_(pa.float32()))]
        )
        with pq.ParquetWriter(self.out / "embeddings.parquet", schema) as writer:
            for s in range(0, max(len(self.refs), 1), _COPY_ROWS):
                refs = self.refs[s : s + _COPY_ROWS]
                vecs = np.ascontiguousarray(cls[s : s + len(refs)], dtype=np.float32)
                offsets = pa.array(np.arange(len(refs) + 1, dtype=np.int32) * self.dim)
                writer.write_table(
                    pa.table(
                        {
                            "row": pa.array(np.arange(s, s + len(refs), dtype=np.int64)),
                            "id": pa.array([r.id for r in refs], pa.string()),
                            "path": pa.array([r.path for r in refs], pa.string()),
                            "cls": pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1))),
                        },
                        schema=schema,
                    )
                )
        skipped = pa.table(
            {
                "id": [s.ref.id for s in self.skipped],
                "path": [s.ref.path for s in self.skipped],
                "reason": [s.reason for s in self.skipped],
            },
            schema=SKIPPED_SCHEMA,
        )
        pq.write_table(skipped, self.out / "skipped.parquet")


def load_embeddings(root: str | Path) -> Embeddings:
    root = Path(root)
    if not (root / META).is_file():
        raise FileNotFoundError(f"{root} is not a finished `lvd embed` output (no {META}); run lvd embed --out {root}")
    meta = json.loads((root / META).read_text())
    table = pq.read_table(root / "embeddings.parquet", columns=["id", "path"])
    patches = root / "patches.npy"
    return Embeddings(
        root=root,
        ids=table["id"].to_pylist(),
        paths=table["path"].to_pylist(),
        cls_ND=np.load(root / "cls.npy", mmap_mode="r"),
        patches_NhwD=np.load(patches, mmap_mode="r") if patches.is_file() else None,
        skipped=pq.read_table(root / "skipped.parquet"),
        meta=meta,
    )
