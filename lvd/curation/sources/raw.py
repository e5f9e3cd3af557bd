"""`RawItem`: one input's bytes (or the error that kept them from being read) and its metadata.

Shared by the source readers (folders, tars, parquet) so none of them imports another.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field

# Source suffix standing for the unreadable rest of a truncated or corrupt tar archive.
CORRUPT_TAR_MEMBER = "<corrupt>"


@dataclass
class RawItem:
    source: str  # file path, TARPATH::MEMBER, or PARQUETPATH::ROW
    data: bytes | None  # None when nothing could be read (then `error` says why)
    error: str | None  # a rejection reason from docs/architecture.md, or None
    meta: dict = field(default_factory=dict)  # sidecars / other parquet columns


def parse_sidecar(suffix: str, raw: bytes):
    """Sidecar bytes as metadata: JSON parsed when it parses, text stripped otherwise."""
    text = raw.decode("utf-8", errors="replace")
    if suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return text  # keep malformed JSON as text rather than losing it
    return text.strip()


# ---------------------------------------------------------------- trust boundary
# Inputs are data. A path named *inside* an input (a Parquet path cell, a symlinked file or
# sidecar in a folder dump) must stay inside the dump, or inside a root the operator named
# (`--allow-root`); URIs in data are read only with `--allow-remote`, and chained or local
# fsspec URLs (`simplecache::...`, `file://`) never. Every read is capped at `max_bytes`,
# checked before reading (stat, tar header, Parquet cell length) and bounded while reading.

DEFAULT_MAX_BYTES = 64 << 20  # one input's bytes (a file, a tar member, a Parquet cell or path)
SIDECAR_MAX_BYTES = 1 << 20  # one `.json`/`.txt`/`.cls` sidecar; a larger one is not read
# Protocols a path cell may name when remote reads are allowed; anything else is never read.
REMOTE_PROTOCOLS = ("http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf")


@dataclass(frozen=True)
class SourceLimits:
    """What the source readers may read (built from `IngestConfig`; see docs/architecture.md)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    allow_roots: tuple[str, ...] = ()  # real (symlink-resolved) absolute folders
    allow_remote: bool = False


class InputRejected(Exception):
    """An input refused before (or instead of) reading it; `reason` is a rejection reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def real_roots(roots) -> tuple[str, ...]:
    """Operator-named roots as real absolute folders (sorted, unique)."""
    return tuple(sorted({os.path.realpath(os.path.expanduser(str(r))) for r in roots}))


def inside(path: str, roots) -> bool:
    """Whether the real location of `path` (every symlink resolved) lies in one of `roots`."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def read_capped(f, max_bytes: int, size: int | None = None) -> bytes:
    """All of `f`, refusing before reading when `size` says it is too big and never holding
    more than `max_bytes + 1` bytes when the size lies or is unknown."""
    if size is not None and size > max_bytes:
        raise InputRejected("too_many_bytes", f"{size} bytes > max_bytes={max_bytes}")
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputRejected("too_many_bytes", f"more than max_bytes={max_bytes}")
    return data


def read_local(path: str, max_bytes: int) -> bytes:
    """A local regular file's bytes, size-checked by stat first (a fifo is refused, not opened:
    opening one blocks forever). A symlink loop raises `InputRejected("symlink_loop")`."""
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputRejected("symlink_loop", path) from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        return read_capped(f, max_bytes, st.st_size)
