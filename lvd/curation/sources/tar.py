"""Tar archives (img2dataset / WebDataset layout) read as data only: nothing is ever extracted.

Members sharing a key (member path up to the first dot of its basename) form one sample;
regular `.json`/`.txt`/`.cls` members whose key has another regular member are its metadata,
every other member is an input: links give `tar_link`, devices and fifos `tar_special`.
A truncated or corrupt archive yields the members read so far, then one record with source
`TARPATH::<corrupt>` and error `corrupt` for the unreadable rest; an OS-level failure to
read the archive gives that record `read_error` instead.

Memory: the archive is streamed (never read whole, gzip included). A first pass reads headers
and the sidecars (each at most `SIDECAR_MAX_BYTES`, all together at most `max_bytes`; beyond
that a sidecar is dropped); a second pass reads the inputs in archive order, one member at a
time. A member whose header size is above `max_bytes` is `too_many_bytes` without a byte of
it being read (the archive stream skips over it).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator

import fsspec

from lvd.curation.sources.raw import (
    CORRUPT_TAR_MEMBER,
    DEFAULT_MAX_BYTES,
    SIDECAR_MAX_BYTES,
    InputRejected,
    RawItem,
    parse_sidecar,
    read_capped,
)

TAR_SIDECAR_SUFFIXES = (".json", ".txt", ".cls")


def _tar_key(name: str) -> str:
    """WebDataset sample key: the member path up to the first dot of its basename."""
    folder, base = os.path.split(name)
    return os.path.join(folder, base.split(".", 1)[0]) if folder else base.split(".", 1)[0]


_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error)


def iter_tar(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[RawItem]:
    """Every input member of the archive at `uri`, in archive order, plus the corrupt-rest record."""
    try:
        with fsspec.open(uri, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
            members, held, complete = _scan_members(tf, max_bytes)
            yield from _tar_records(uri, tf, members, held, max_bytes)
    except _TAR_DATA_ERRORS:  # not a tar at all, or a compressed stream that breaks off
        complete = False
    except OSError:
        yield RawItem(source=f"{uri}::{CORRUPT_TAR_MEMBER}", data=None, error="read_error")
        return
    if not complete:
        yield RawItem(source=f"{uri}::{CORRUPT_TAR_MEMBER}", data=None, error="corrupt")


def _scan_members(tf: tarfile.TarFile, max_bytes: int) -> tuple[list[tarfile.TarInfo], dict[int, bytes], bool]:
    """Headers, plus the bytes of small sidecar-named members read as the stream passes them
    (by member position); stops at the first unreadable header and says whether it finished."""
    members, held, budget = [], {}, max_bytes
    while True:
        try:
            info = tf.next()
        except _TAR_DATA_ERRORS:
            return members, held, False
        if info is None:
            return members, held, True
        if info.isreg() and _is_tar_sidecar(info.name) and info.size <= min(SIDECAR_MAX_BYTES, budget):
            try:  # the stream is at this member's data now: reading it costs no extra pass
                held[len(members)] = _member_bytes(tf, info, SIDECAR_MAX_BYTES)
                budget -= info.size
            except (*_TAR_DATA_ERRORS, OSError, InputRejected):
                pass  # metadata is optional; an input member is read again in the second pass
        members.append(info)


def _tar_records(
    uri: str, tf: tarfile.TarFile, members: list[tarfile.TarInfo], held: dict[int, bytes], max_bytes: int
) -> Iterator[RawItem]:
    regular_keys = {_tar_key(m.name) for m in members if m.isreg() and not _is_tar_sidecar(m.name)}
    sidecars: dict[str, dict] = {}
    for i, m in enumerate(members):
        if i in held and _tar_key(m.name) in regular_keys:
            suffix = os.path.splitext(m.name)[1].lower()
            sidecars.setdefault(_tar_key(m.name), {})[suffix[1:]] = parse_sidecar(suffix, held[i])
    held.clear()  # inputs are read in the pass below, one at a time
    for m in members:
        if m.isdir() or (m.isreg() and _is_tar_sidecar(m.name) and _tar_key(m.name) in regular_keys):
            continue
        yield _tar_member_item(uri, tf, m, sidecars.get(_tar_key(m.name), {}), max_bytes)


def _is_tar_sidecar(name: str) -> bool:
    return name.lower().endswith(TAR_SIDECAR_SUFFIXES)


def _tar_member_item(uri: str, tf: tarfile.TarFile, m: tarfile.TarInfo, meta: dict, max_bytes: int) -> RawItem:
    source = f"{uri}::{m.name}"
    if m.issym() or m.islnk():
        return RawItem(source=source, data=None, error="tar_link", meta=meta)
    if not m.isreg():
        return RawItem(source=source, data=None, error="tar_special", meta=meta)
    try:
        return RawItem(source=source, data=_member_bytes(tf, m, max_bytes), error=None, meta=meta)
    except InputRejected as rej:  # header size above the cap: not a byte of it was read
        return RawItem(source=source, data=None, error=rej.reason, meta=meta)
    except _TAR_DATA_ERRORS:
        return RawItem(source=source, data=None, error="corrupt", meta=meta)
    except OSError:
        return RawItem(source=source, data=None, error="read_error", meta=meta)


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo, max_bytes: int) -> bytes:
    if m.size > max_bytes:  # the header's size, before opening the member
        raise InputRejected("too_many_bytes", f"{m.name}: {m.size} bytes > max_bytes={max_bytes}")
    f = tf.extractfile(m)  # a file object over the archive bytes; never touches the filesystem
    data = read_capped(f, max_bytes, m.size)
    if len(data) != m.size:
        raise tarfile.ReadError(f"member {m.name!r} is truncated")
    return data
