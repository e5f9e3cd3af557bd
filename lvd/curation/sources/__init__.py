"""Turn `--input` paths/URIs into deterministic partitions and iterate their raw items.

A DUMP is a folder tree of images, a tar archive (img2dataset / WebDataset layout), a folder
holding tars, or a Parquet file with an image-bytes or image-path column. Paths may be local
or fsspec URIs. Every input becomes exactly one `RawItem`, carrying bytes or an error string,
so ingest can account for it; sidecar metadata (`.json`/`.txt`/`.cls`) is not an input.

Partitions:
- "files": `uri` is the dump root, `items` the file paths (up to `files_per_partition`).
- "tar": one per archive, `items` is empty (members are discovered when iterating).
- "parquet": `rows` is the half-open row range `(start, stop)` of the file, `items` is empty.

`fingerprint` hashes the kind, uri, rows and every item's name, size and mtime (for tar and
parquet partitions the archive's own size and mtime), so a changed input changes it.

Tars are read by `tar_source` (data only, never extracted; a truncated archive ends with a
`TARPATH::<corrupt>` record), parquet by `parquet_source` (column auto-detection).

Folder walks are sorted, never follow directory symlinks (loops), and read symlinked files as
data when their target lies inside the dump folder or an `--allow-root` (else the file is
rejected `path_outside_root`; a sidecar outside is not read); a symlink loop is
`symlink_loop`, and a top-level input that is one is an error saying so. Every read is capped
(`SourceLimits.max_bytes`, from `IngestConfig`): a file is stat-ed first and refused as
`too_many_bytes` without being opened. In a folder, `NAME.parquet` and `NAME_stats.json` beside a tar or folder `NAME` are
img2dataset bookkeeping and are skipped; other `.parquet` files become parquet partitions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import fsspec

from lvd.curation.sources import parquet as parquet_source
from lvd.curation.sources import tar as tar_source
from lvd.curation.sources.raw import (
    CORRUPT_TAR_MEMBER,
    SIDECAR_MAX_BYTES,
    InputRejected,
    RawItem,
    SourceLimits,
    inside,
    parse_sidecar,
    read_capped,
    read_local,
)

__all__ = ["CORRUPT_TAR_MEMBER", "Partition", "RawItem", "SourceLimits", "iter_items", "plan_partitions"]

SIDECAR_SUFFIXES = (".json", ".txt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Partition:
    """One unit of work, retry and resume (fields described in the module docstring)."""

    index: int
    kind: Literal["files", "tar", "parquet"]
    uri: str
    items: tuple[str, ...] = ()
    rows: tuple[int, int] | None = None
    fingerprint: str = ""


@dataclass
class _Found:
    """What one input expands to before indexes are assigned."""

    files: list[tuple[str, tuple[int, object]]] = field(default_factory=list)
    tars: list[str] = field(default_factory=list)
    parquets: list[str] = field(default_factory=list)


def plan_partitions(
    inputs: Sequence[str], *, files_per_partition: int = 256, parquet_rows_per_partition: int = 1024
) -> list[Partition]:
    """Deterministic partitions over `inputs` (in the order given; walks sorted), indexed 0..n-1."""
    if files_per_partition < 1 or parquet_rows_per_partition < 1:
        raise ValueError("files_per_partition and parquet_rows_per_partition must be >= 1")
    specs: list[dict] = []
    for uri in inputs:
        fs, root = fsspec.core.url_to_fs(uri)
        found = _discover(fs, root, uri)
        for start in range(0, len(found.files), files_per_partition):
            chunk = found.files[start : start + files_per_partition]
            specs.append(dict(kind="files", uri=_display(fs, root), items=chunk))
        for tar in found.tars:
            specs.append(dict(kind="tar", uri=tar, items=[(tar, _stat(fs, tar))]))
        for pq_uri in found.parquets:
            n_rows = parquet_source.count_rows(pq_uri)
            for start in range(0, n_rows, parquet_rows_per_partition):
                rows = (start, min(start + parquet_rows_per_partition, n_rows))
                specs.append(dict(kind="parquet", uri=pq_uri, rows=rows, items=[(pq_uri, _stat(fs, pq_uri))]))
    return [_make_partition(i, **spec) for i, spec in enumerate(specs)]


def _make_partition(index: int, *, kind: str, uri: str, items: list, rows=None) -> Partition:
    digest = hashlib.sha256(json.dumps([kind, uri, rows]).encode())
    for name, (size, mtime) in items:
        digest.update(f"\0{name}\0{size}\0{mtime!r}".encode())
    names = tuple(name for name, _ in items) if kind == "files" else ()
    return Partition(index=index, kind=kind, uri=uri, items=names, rows=rows, fingerprint=digest.hexdigest())


def _display(fs, path: str) -> str:
    """The string users see for `path`: absolute local path, or the URI with its protocol."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _stat(fs, uri: str) -> tuple[int, object]:
    return _size_stamp(fs.info(uri))


def _size_stamp(info: dict) -> tuple[int, object]:
    """Size and a change stamp; backends name it differently (local mtime, s3 LastModified...)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "ETag", "etag"):
        if info.get(key) is not None:
            return int(info.get("size") or 0), str(info[key])
    return int(info.get("size") or 0), ""


def _discover(fs, root: str, uri: str) -> _Found:
    if not fs.exists(root):
        if _is_local(fs) and os.path.islink(root):
            _raise_bad_link(root, uri)
        raise ValueError(f"input {uri!r} does not exist: pass an existing folder, tar or parquet file")
    found = _Found()
    if not fs.isdir(root):
        _classify_single(fs, root, uri, found)
        return found
    entries = _walk_local(root) if _is_local(fs) else _walk_remote(fs, root)
    _split_folder(entries, found)
    return found


def _raise_bad_link(root: str, uri: str) -> None:
    try:
        os.stat(root)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(
                f"input {uri!r} is a symlink loop ({err.strerror}): point it at a real folder, tar or parquet file"
            ) from None
    raise ValueError(f"input {uri!r} is a broken symlink to {os.readlink(root)!r}: fix the link or pass the real path")


def _classify_single(fs, root: str, uri: str, found: _Found) -> None:
    name = root.lower()
    if name.endswith(TAR_SUFFIXES):
        found.tars.append(_display(fs, root))
    elif name.endswith(".parquet"):
        found.parquets.append(_display(fs, root))
    else:  # a single image file is a one-item dump
        found.files.append((_display(fs, root), _stat(fs, root)))


def _walk_local(root: str) -> list[tuple[str, tuple[int, object]]]:
    """Sorted (path, (size, mtime)) of regular files and file symlinks; dir symlinks are skipped."""
    out, stack = [], [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in reversed(entries):  # reversed + stack pop keeps sorted depth-first order
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
        for entry in entries:
            if _is_dir(entry):  # real dirs are walked above; symlinked dirs are never followed
                continue
            try:
                st = entry.stat()  # follows file symlinks: the target's size/mtime
            except OSError:  # broken symlink: still an input, reading it gives read_error
                st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):  # fifos/sockets are not files
                out.append((entry.path, (st.st_size, st.st_mtime)))
    return sorted(out, key=lambda x: x[0])


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP): an input whose read says symlink_loop
        return False


def _walk_remote(fs, root: str) -> list[tuple[str, tuple[int, object]]]:
    infos = fs.find(root, detail=True)
    out = []
    for path, info in sorted(infos.items()):
        if info.get("type") == "file":
            out.append((fs.unstrip_protocol(path), _size_stamp(info)))
    return out


def _split_folder(entries, found: _Found) -> None:
    """Sort a folder's files into image inputs, tars, parquets; drop sidecars and bookkeeping."""
    paths = {p for p, _ in entries}
    folders = {os.path.dirname(p) for p in paths}
    not_images = SIDECAR_SUFFIXES + TAR_SUFFIXES + (".parquet",)
    image_stems = {_stem(p) for p in paths if not p.lower().endswith(not_images)}
    tar_stems = {_strip_tar_suffix(p) for p in paths if p.lower().endswith(TAR_SUFFIXES)}
    bookkeeping = tar_stems | folders
    for path, st in entries:
        low = path.lower()
        if low.endswith(TAR_SUFFIXES):
            found.tars.append(path)
        elif (
            low.endswith(".parquet")
            and path[: -len(".parquet")] in bookkeeping
            or low.endswith("_stats.json")
            and path[: -len("_stats.json")] in bookkeeping
        ):
            continue
        elif low.endswith(".parquet"):
            found.parquets.append(path)
        elif low.endswith(SIDECAR_SUFFIXES) and _stem(path) in image_stems:
            continue
        else:
            found.files.append((path, st))


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def _strip_tar_suffix(path: str) -> str:
    low = path.lower()
    for suffix in TAR_SUFFIXES:
        if low.endswith(suffix):
            return path[: -len(suffix)]
    return path


# ---------------------------------------------------------------- iteration


def iter_items(partition: Partition, limits: SourceLimits = SourceLimits()) -> Iterator[RawItem]:
    """Every input of `partition` as a `RawItem`, in a deterministic order, read within `limits`."""
    if partition.kind == "files":
        yield from _iter_files(partition.uri, partition.items, limits)
    elif partition.kind == "tar":
        yield from tar_source.iter_tar(partition.uri, limits.max_bytes)
    elif partition.kind == "parquet":
        start, stop = partition.rows
        yield from (RawItem(**kw) for kw in parquet_source.iter_rows(partition.uri, start, stop, limits))
    else:
        raise ValueError(f"unknown partition kind {partition.kind!r}: expected files, tar or parquet")


def _read(uri: str, max_bytes: int, roots: tuple[str, ...] | None) -> bytes:
    """Capped read; a local file (stat first: fifos, loops and sizes are refused before open)
    must lie inside `roots` unless `roots` is None (a top-level single-file input)."""
    if not os.path.isabs(uri):  # a URI: fsspec (local paths skip its per-call overhead)
        with fsspec.open(uri, "rb") as f:
            size = getattr(f, "size", None)
            return read_capped(f, max_bytes, size if isinstance(size, int) else None)
    if roots is not None and os.path.islink(uri) and not inside(uri, roots):
        os.stat(uri)  # a loop or a broken link says so (symlink_loop / read_error) first
        raise InputRejected("path_outside_root", uri)
    return read_local(uri, max_bytes)


def _iter_files(root: str, paths: Sequence[str], limits: SourceLimits) -> Iterator[RawItem]:
    # Symlinks in a folder dump must resolve inside it (or an allowed root); the walk never
    # enters a symlinked folder, so only the file itself can be a link.
    local_dir = os.path.isabs(root) and os.path.isdir(root)
    roots = (os.path.realpath(root), *limits.allow_roots) if local_dir else None
    for path in paths:
        try:
            data, error = _read_reason(path, limits.max_bytes, roots), None
        except InputRejected as rej:
            data, error = None, rej.reason
        except OSError:
            data, error = None, "read_error"
        yield RawItem(source=path, data=data, error=error, meta=_folder_sidecars(path, roots))


def _read_reason(path: str, max_bytes: int, roots) -> bytes:
    try:
        return _read(path, max_bytes, roots)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputRejected("symlink_loop", path) from None
        raise


def _folder_sidecars(path: str, roots) -> dict:
    meta = {}
    for suffix in SIDECAR_SUFFIXES:
        if path.endswith(suffix):  # a lone notes.txt is an input, not its own sidecar
            continue
        try:
            meta[suffix[1:]] = parse_sidecar(suffix, _read(_stem(path) + suffix, SIDECAR_MAX_BYTES, roots))
        except (OSError, ValueError, InputRejected):
            continue  # no sidecar (or unreadable, too big, outside the dump): metadata is optional
    return meta
