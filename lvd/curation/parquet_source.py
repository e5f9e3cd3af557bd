"""Parquet dumps: find the image column and read a row range as raw-item fields.

The image column is auto-detected, first match wins:
1. a binary column named `image`, `jpg`, `bytes` or `image_bytes`;
2. a struct column with a binary `bytes` field (what Hugging Face `datasets` writes for
   `Image()` features; its `path` field is used when `bytes` is null);
3. a string column named `path`, `image_path` or `url` holding paths, resolved relative to
   the Parquet file's folder (absolute paths and fsspec URIs are used as they are; web URLs
   are never fetched: downloading is img2dataset's job, so they give `read_error`).
Every other column of the row goes into `meta`. A null image cell gives error `empty`
(no bytes, so no uid); a path that cannot be read gives `read_error`.
"""

from __future__ import annotations

import base64
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

BYTES_COLUMNS = ("image", "jpg", "bytes", "image_bytes")
PATH_COLUMNS = ("path", "image_path", "url")


@dataclass(frozen=True)
class ImageColumn:
    name: str
    kind: str  # "bytes" | "struct" | "path"


def count_rows(uri: str) -> int:
    with fsspec.open(uri, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"parquet {uri!r} cannot be read ({err}): fix or remove it") from err
        find_image_column(pf.schema_arrow, uri)  # fail at planning time, not inside a worker
        return pf.metadata.num_rows


def find_image_column(schema: pa.Schema, uri: str) -> ImageColumn:
    def is_binary(t: pa.DataType) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    for name in BYTES_COLUMNS:
        if name in schema.names and is_binary(schema.field(name).type):
            return ImageColumn(name, "bytes")
    for f in schema:
        if pa.types.is_struct(f.type):
            sub = {f.type.field(i).name: f.type.field(i).type for i in range(f.type.num_fields)}
            if "bytes" in sub and is_binary(sub["bytes"]):
                return ImageColumn(f.name, "struct")
    for name in PATH_COLUMNS:
        if name in schema.names and pa.types.is_string(schema.field(name).type):
            return ImageColumn(name, "path")
    raise ValueError(
        f"parquet {uri!r} has no usable image column: expected a binary column named one of "
        f"{BYTES_COLUMNS}, a struct column with a binary 'bytes' field, or a string path column "
        f"named one of {PATH_COLUMNS}; found columns {schema.names}"
    )


def iter_rows(uri: str, start: int, stop: int) -> Iterator[dict]:
    """RawItem keyword dicts for rows [start, stop) of `uri`, reading only the row groups needed."""
    with fsspec.open(uri, "rb") as f:
        pf = pq.ParquetFile(f)
        column = find_image_column(pf.schema_arrow, uri)
        groups, first_row = _row_groups_for(pf, start, stop)
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    table = table.slice(start - first_row, stop - start)
    rows = table.to_pylist()
    for offset, row in enumerate(rows):
        cell = row.pop(column.name)
        data, error = _cell_bytes(cell, column, uri)
        if column.kind == "struct" and isinstance(cell, dict) and cell.get("path"):
            row["path"] = cell["path"]
        yield dict(source=f"{uri}::{start + offset}", data=data, error=error, meta=_jsonable(row))


def _row_groups_for(pf: pq.ParquetFile, start: int, stop: int) -> tuple[list[int], int]:
    groups, row, first = [], 0, None
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if row < stop and row + n > start:
            groups.append(i)
            first = row if first is None else first
        row += n
    return groups, first or 0


def _cell_bytes(cell, column: ImageColumn, uri: str) -> tuple[bytes | None, str | None]:
    if column.kind == "struct":
        cell = cell or {}
        if cell.get("bytes") is not None:
            return cell["bytes"], None
        return _path_bytes(cell.get("path"), uri)
    if column.kind == "path":
        return _path_bytes(cell, uri)
    return (cell, None) if cell is not None else (None, "empty")


def _path_bytes(path: str | None, parquet_uri: str) -> tuple[bytes | None, str | None]:
    if not path:
        return None, "empty"
    if path.lower().startswith(("http://", "https://")):
        return None, "read_error"
    try:
        with fsspec.open(_resolve(path, parquet_uri), "rb") as f:
            return f.read(), None
    except (OSError, ValueError, ImportError):  # missing file, or an fsspec backend not installed
        return None, "read_error"


def _resolve(path: str, parquet_uri: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in parquet_uri:
        return posixpath.join(posixpath.dirname(parquet_uri), path)
    return os.path.join(os.path.dirname(parquet_uri), path)


def _jsonable(row: dict) -> dict:
    """Parquet values as JSON-friendly ones; bytes become base64 so metadata is never lost."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out[key] = value
    return out
