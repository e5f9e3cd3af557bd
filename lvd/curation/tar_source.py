"""Tar archives (img2dataset / WebDataset layout) read as data only: nothing is ever extracted.

Members sharing a key (member path up to the first dot of its basename) form one sample;
regular `.json`/`.txt`/`.cls` members whose key has another regular member are its metadata,
every other member is an input: links give `tar_link`, devices and fifos `tar_special`.
A truncated or corrupt archive yields the members read so far, then one record with source
`TARPATH::<corrupt>` and error `corrupt` for the unreadable rest; an OS-level failure to
read the archive gives that record `read_error` instead.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator

import fsspec

from lvd.curation.raw import CORRUPT_TAR_MEMBER, RawItem, parse_sidecar

TAR_SIDECAR_SUFFIXES = (".json", ".txt", ".cls")


def _tar_key(name: str) -> str:
    """WebDataset sample key: the member path up to the first dot of its basename."""
    folder, base = os.path.split(name)
    return os.path.join(folder, base.split(".", 1)[0]) if folder else base.split(".", 1)[0]


_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error)


def iter_tar(uri: str) -> Iterator[RawItem]:
    """Every input member of the archive at `uri`, in archive order, plus the corrupt-rest record."""
    try:
        with fsspec.open(uri, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
            members, complete = _scan_members(tf)
            yield from _tar_records(uri, tf, members)
    except _TAR_DATA_ERRORS:  # not a tar at all, or a compressed stream that breaks off
        complete = False
    except OSError:
        yield RawItem(source=f"{uri}::{CORRUPT_TAR_MEMBER}", data=None, error="read_error")
        return
    if not complete:
        yield RawItem(source=f"{uri}::{CORRUPT_TAR_MEMBER}", data=None, error="corrupt")


def _scan_members(tf: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], bool]:
    """Headers only; stops at the first unreadable header and says whether the scan finished."""
    members = []
    while True:
        try:
            info = tf.next()
        except _TAR_DATA_ERRORS:
            return members, False
        if info is None:
            return members, True
        members.append(info)


def _tar_records(uri: str, tf: tarfile.TarFile, members: list[tarfile.TarInfo]) -> Iterator[RawItem]:
    regular_keys = {_tar_key(m.name) for m in members if m.isreg() and not _is_tar_sidecar(m.name)}
    sidecars: dict[str, dict] = {}
    for m in members:
        if m.isreg() and _is_tar_sidecar(m.name) and _tar_key(m.name) in regular_keys:
            suffix = os.path.splitext(m.name)[1].lower()
            try:
                sidecars.setdefault(_tar_key(m.name), {})[suffix[1:]] = parse_sidecar(suffix, _member_bytes(tf, m))
            except (*_TAR_DATA_ERRORS, OSError):
                continue  # metadata is optional; the sample itself still gets its record
    for m in members:
        if m.isdir() or (m.isreg() and _is_tar_sidecar(m.name) and _tar_key(m.name) in regular_keys):
            continue
        yield _tar_member_item(uri, tf, m, sidecars.get(_tar_key(m.name), {}))


def _is_tar_sidecar(name: str) -> bool:
    return name.lower().endswith(TAR_SIDECAR_SUFFIXES)


def _tar_member_item(uri: str, tf: tarfile.TarFile, m: tarfile.TarInfo, meta: dict) -> RawItem:
    source = f"{uri}::{m.name}"
    if m.issym() or m.islnk():
        return RawItem(source=source, data=None, error="tar_link", meta=meta)
    if not m.isreg():
        return RawItem(source=source, data=None, error="tar_special", meta=meta)
    try:
        return RawItem(source=source, data=_member_bytes(tf, m), error=None, meta=meta)
    except _TAR_DATA_ERRORS:
        return RawItem(source=source, data=None, error="corrupt", meta=meta)
    except OSError:
        return RawItem(source=source, data=None, error="read_error", meta=meta)


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(m)  # a file object over the archive bytes; never touches the filesystem
    data = f.read()
    if len(data) != m.size:
        raise tarfile.ReadError(f"member {m.name!r} is truncated")
    return data
