"""Parquet dumps: find the image column and read a row range as raw-item fields.

The image column is auto-detected, first match wins:
1. a binary column named `image`, `jpg`, `bytes` or `image_bytes`;
2. a struct column with a binary `bytes` field (what Hugging Face `datasets` writes for
   `Image()` features; its `path` field is used when `bytes` is null);
3. a string column named `path`, `image_path` or `url` holding paths.
A column with one of those names but another type is an error naming it, its type and the
accepted types. Every other column of the row goes into `meta`. A null image cell gives error
`empty` (no bytes, so no uid); a path that cannot be read gives `read_error`.

Path cells are data, not instructions (nothing outside the dump is read, stat-ed or hashed):
- a relative path resolves against the Parquet file's folder; it (and an absolute path) is
  read only when its real location (symlinks resolved) lies inside that folder or inside a
  `SourceLimits.allow_roots` folder (`--allow-root`), else `path_outside_root`;
- a URI (`PROTO://...`) is read only with `allow_remote` (`--allow-remote`) and a protocol in
  `REMOTE_PROTOCOLS`; chained fsspec URLs (`simplecache::http://...`, `blockcache::...`),
  `file://` and every other protocol are never read: `remote_path`;
- in a remote Parquet file (the operator's own `--input s3://...`) a relative path resolves in
  its folder and must not climb out of it (`..`).
Caps: a path's file is stat-ed (or its remote size asked) before it is read, a cell's length
is checked before it is copied out of Arrow: above `max_bytes` -> `too_many_bytes`. Rows are
read in batches (`iter_batches`) sized from the row group's average image-cell size so a batch
holds about `max_bytes` of images, never a whole row group at once. Arrow still decodes a batch
(at least one cell) before its lengths are known, so a single giant cell is decompressed once.
"""

from __future__ import annotations

import base64
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.sources.raw import REMOTE_PROTOCOLS, InputRejected, SourceLimits, inside, read_capped, read_local

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
        if name in schema.names and _is_string(schema.field(name).type):
            return ImageColumn(name, "path")
    mistyped = [f"{n!r} is {schema.field(n).type}" for n in (*BYTES_COLUMNS, *PATH_COLUMNS) if n in schema.names]
    hint = f" ({'; '.join(mistyped)}: not an accepted type)" if mistyped else ""
    raise ValueError(
        f"parquet {uri!r} has no usable image column{hint}: expected a binary or large_binary "
        f"column named one of {BYTES_COLUMNS}, a struct column with a binary 'bytes' field, or a "
        f"string or large_string path column named one of {PATH_COLUMNS}; found columns "
        f"{[f'{f.name}: {f.type}' for f in schema]}"
    )


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def iter_rows(uri: str, start: int, stop: int, limits: SourceLimits = SourceLimits()) -> Iterator[dict]:
    """RawItem keyword dicts for rows [start, stop) of `uri`, in row batches of the row groups needed."""
    with fsspec.open(uri, "rb") as f:
        column = find_image_column(pq.ParquetFile(f).schema_arrow, uri)
        # Image cells read as dictionary arrays: a value repeated in a dictionary-encoded column
        # is held once, not once per row, so a batch costs what its pages hold.
        leaf = f"{column.name}.bytes" if column.kind == "struct" else column.name
        pf = pq.ParquetFile(f, read_dictionary=[leaf] if column.kind != "path" else None)
        groups, first_row = _row_groups_for(pf, start, stop)
        row = first_row
        batches = (
            pf.iter_batches(batch_size=_batch_rows(pf, groups, column, limits.max_bytes), row_groups=groups)
            if groups
            else ()
        )
        for batch in batches:
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            if hi > lo:
                yield from _batch_items(batch.slice(lo, hi - lo), row + lo, column, uri, limits)
            row += batch.num_rows
            if row >= stop:
                break


def _batch_rows(pf: pq.ParquetFile, groups: list[int], column: ImageColumn, max_bytes: int) -> int:
    """Rows per batch so a batch's image cells average about `max_bytes` (1..1024 rows)."""
    leaves = [
        i for i in range(pf.metadata.num_columns) if pf.metadata.schema.column(i).path.split(".")[0] == column.name
    ]
    worst = 1.0
    for g in groups:
        rg = pf.metadata.row_group(g)
        size = sum(rg.column(i).total_uncompressed_size for i in leaves)
        worst = max(worst, size / max(rg.num_rows, 1))
    return int(min(1024, max(1, max_bytes // worst)))


def _batch_items(
    batch: pa.RecordBatch, first: int, column: ImageColumn, uri: str, limits: SourceLimits
) -> Iterator[dict]:
    """One row at a time: a cell's length is read from Arrow before it is copied to Python, and
    only one row's image is ever a Python object."""
    cells = batch.column(column.name)
    inline = cells.field("bytes") if column.kind == "struct" else cells if column.kind == "bytes" else None
    lengths = _lengths(inline) if inline is not None else [0] * batch.num_rows
    others = [(name, batch.column(name)) for name in batch.schema.names if name != column.name]
    for i in range(batch.num_rows):
        row = {name: values[i].as_py() for name, values in others}
        if lengths[i] > limits.max_bytes:
            data, error = None, "too_many_bytes"
            path = cells.field("path")[i].as_py() if column.kind == "struct" and "path" in _field_names(cells) else None
        else:
            cell = cells[i].as_py()
            data, error = _cell_bytes(cell, column, uri, limits)
            path = cell.get("path") if column.kind == "struct" and isinstance(cell, dict) else None
        if path:
            row["path"] = path
        yield dict(source=f"{uri}::{first + i}", data=data, error=error, meta=_jsonable(row))


def _lengths(inline: pa.Array) -> list[int]:
    if pa.types.is_dictionary(inline.type):  # read_dictionary: each distinct value held once
        lengths = pc.take(pc.binary_length(inline.dictionary), inline.indices)
    else:
        lengths = pc.binary_length(inline)
    return lengths.fill_null(0).to_pylist()


def _field_names(cells: pa.Array) -> set[str]:
    return {cells.type.field(i).name for i in range(cells.type.num_fields)}


def _row_groups_for(pf: pq.ParquetFile, start: int, stop: int) -> tuple[list[int], int]:
    groups, row, first = [], 0, None
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if row < stop and row + n > start:
            groups.append(i)
            first = row if first is None else first
        row += n
    return groups, first or 0


def _cell_bytes(cell, column: ImageColumn, uri: str, limits: SourceLimits) -> tuple[bytes | None, str | None]:
    if column.kind == "struct":
        cell = cell or {}
        if cell.get("bytes") is not None:
            return cell["bytes"], None
        return _path_bytes(cell.get("path"), uri, limits)
    if column.kind == "path":
        return _path_bytes(cell, uri, limits)
    return (cell, None) if cell is not None else (None, "empty")


def _path_bytes(path: str | None, parquet_uri: str, limits: SourceLimits) -> tuple[bytes | None, str | None]:
    if not path:
        return None, "empty"
    try:
        return _read_path(path, parquet_uri, limits), None
    except InputRejected as rej:
        return None, rej.reason
    except (OSError, ValueError, ImportError):  # missing file, or an fsspec backend not installed
        return None, "read_error"


def _read_path(path: str, parquet_uri: str, limits: SourceLimits) -> bytes:
    """A path cell's bytes under the rules of the module docstring (checked before any I/O)."""
    if "::" in path or "://" in path:
        proto = path.split("://", 1)[0].lower() if "://" in path else ""
        if "::" in path or not limits.allow_remote or proto not in REMOTE_PROTOCOLS:
            raise InputRejected("remote_path", path)
        return _read_uri(path, limits.max_bytes)
    if "://" in parquet_uri:  # the operator's remote dump: stay in its folder
        folder = posixpath.dirname(parquet_uri)
        target = posixpath.normpath(posixpath.join(folder.split("://", 1)[1], path))
        if path.startswith("/") or not target.startswith(folder.split("://", 1)[1].rstrip("/") + "/"):
            raise InputRejected("path_outside_root", path)
        return _read_uri(f"{folder.split('://', 1)[0]}://{target}", limits.max_bytes)
    folder = os.path.dirname(os.path.abspath(parquet_uri))
    target = os.path.join(folder, path)  # an absolute `path` replaces the folder
    if not inside(target, (os.path.realpath(folder), *limits.allow_roots)):
        raise InputRejected("path_outside_root", path)
    return read_local(target, limits.max_bytes)


def _read_uri(uri: str, max_bytes: int) -> bytes:
    fs, p = fsspec.core.url_to_fs(uri)
    size = fs.size(p)  # before reading; read_capped bounds the read when it lies
    with fs.open(p, "rb") as f:
        return read_capped(f, max_bytes, size)


def _jsonable(row: dict) -> dict:
    """Parquet values as JSON-friendly ones; bytes become base64 so metadata is never lost."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out[key] = value
    return out
