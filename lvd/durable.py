"""Durable writes: a file is either absent or complete, on disk, under its final name.

`write_atomic(path, write)` writes through `write(f)` to a unique temp name in the same folder
(`.NAME.tmp-<pid>-<uuid>.tmp`, so two writers of one path never share a temp file), flushes and
fsyncs the file, renames it over `path` (atomic on POSIX within a filesystem) and fsyncs the
folder, so the rename itself survives a power cut. A failure removes the temp file; a killed
process leaves at most a temp file, which `is_temp` recognises for cleanup.

`file_digest(path)` is what done-markers record of each output: size and sha256. Checking the
size is one `stat`; hashing reads the whole file (about 1-2 GB/s per core), which is why
readers check sizes always and digests only when asked (see `runner.is_done`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_TAG = ".tmp-"  # in every temp name this module makes
_CHUNK = 1 << 20


def temp_path(path: Path) -> Path:
    """A temp name beside `path` unique to this process and call."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex}.tmp")


def is_temp(name: str) -> bool:
    return TMP_TAG in name


def fsync_dir(folder: Path) -> None:
    """fsync a folder so renames and new names in it are on disk (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` durably through `write(f)` (f: a binary file opened on a temp name)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_parquet(path: str | os.PathLike, table, **kwargs) -> Path:
    """`pq.write_table(table, ...)` durably."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda f: pq.write_table(table, f, **kwargs))


def file_digest(path: str | os.PathLike) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    sha = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": sha.hexdigest()}
