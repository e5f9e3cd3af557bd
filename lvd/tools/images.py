"""Images to embed: a folder tree, or curation's WebDataset shards, split into units of work.

A unit is a chunk of folder files or one shard; it is what one call (in process or on a Ray
actor) reads and embeds. Every image gets an `ImageRef`:
- folder: `id` = the path relative to the folder (POSIX), `path` = the absolute file path;
- shards: `id` = the sample's `uid` from `KEY.json` (its key when there is none), `path` =
  `SHARD.tar::KEY.jpg` (the curation `RawItem.source` convention for tar members).
A sample that cannot be read or decoded comes back with a reason instead of an image, never
an exception: embedding a dump must not stop at one bad file.

Decoding goes through curation ingest's gate (`ingest.open_checked` with `TOOL_LIMITS`, the
ingest defaults): only ingest's allow-listed formats are tried, and an input above
`max_bytes` (checked by stat / tar header before reading), `max_pixels` or `max_decoded_bytes`
(from the header, before decoding) is refused: reason `read_error: too_many_bytes: ...` when
the read is refused, `decode_error: ImageRejected: <ingest reason>` when the gate refuses.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lvd.curation.ingest import ImageRejected, IngestConfig, open_checked
from lvd.curation.sources.raw import InputRejected, read_local

TOOL_LIMITS = IngestConfig()  # formats allow-list and size caps: the same as `lvd curate`'s defaults

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MEMBER_SEP = "::"
_OBJECT_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-f]+>")  # Pillow names the BytesIO; reasons stay reproducible


@dataclass(frozen=True)
class ImageRef:
    id: str
    path: str


@dataclass(frozen=True)
class Loaded:
    """One input: its decoded RGB image, or the reason it has none."""

    ref: ImageRef
    image: Image.Image | None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Unit:
    """A chunk of folder files (`files`, relative to `root`) or one `shard`; `bound` is the most
    images it can yield (the shard's sample count from its tar headers)."""

    index: int
    root: str = ""
    files: tuple[str, ...] = ()
    shard: str | None = None
    bound: int


def is_shard_source(spec: str | os.PathLike) -> bool:
    """Shards: a .tar path, a brace pattern, or a folder holding `shard-*.tar`."""
    s = os.fspath(spec)
    if s.endswith(".tar") or "{" in s:
        return True
    return Path(s).is_dir() and any(Path(s).glob("shard-*.tar"))


def plan_units(spec: str | os.PathLike, *, chunk: int = 256) -> list[Unit]:
    """Units of work over a folder tree or shards, in a fixed order."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: use at least 1 image per unit")
    if is_shard_source(spec):
        from lvd.pretrain.data.shard_stream import count_samples, expand_shards

        shards = [os.path.abspath(s) for s in expand_shards(spec)]  # Ray workers do not share our cwd
        return [Unit(index=i, shard=s, bound=count_samples(s)) for i, s in enumerate(shards)]
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"--images {spec}: not a folder of images nor WebDataset shards (a .tar, a {{000..009}} pattern or a folder of shard-*.tar)"
        )
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    chunks = [tuple(files[i : i + chunk]) for i in range(0, len(files), chunk)]
    return [Unit(index=i, root=str(root.resolve()), files=c, bound=len(c)) for i, c in enumerate(chunks)]


@dataclass(frozen=True)
class Raw:
    """One input's bytes, or the reason there are none."""

    ref: ImageRef
    data: bytes | None
    reason: str | None = None


def read_raw(unit: Unit) -> Iterator[Raw]:
    """The unit's inputs in order, undecoded (decoding can then run on a thread pool)."""
    if unit.shard is not None:
        yield from _read_shard(unit.shard)
        return
    for rel in unit.files:
        ref = ImageRef(rel, str(Path(unit.root) / rel))
        try:
            yield Raw(ref, read_local(ref.path, TOOL_LIMITS.max_bytes))
        except InputRejected as e:
            yield Raw(ref, None, f"read_error: {e}")
        except OSError as e:
            yield Raw(ref, None, f"read_error: {e}")


def read_unit(unit: Unit, *, min_side: int) -> Iterator[Loaded]:
    """The unit's images in order, decoded (see `decode`)."""
    return (decode(raw, min_side) for raw in read_raw(unit))


def _read_shard(shard: str) -> Iterator[Raw]:
    from lvd.pretrain.data.shard_stream import read_shard

    for sample in read_shard(shard):
        ext = next((k for k in SHARD_IMAGE_KEYS if k in sample.files), None)
        uid = _uid(sample.files.get("json"), sample.key)
        ref = ImageRef(uid, f"{shard}{MEMBER_SEP}{sample.key}.{ext or 'jpg'}")
        if ext is None:
            yield Raw(ref, None, f"no_image_member: sample {sample.key} has only {sorted(sample.files)}")
        else:
            yield Raw(ref, sample.files[ext])


def _uid(meta: bytes | None, key: str) -> str:
    try:
        return str(json.loads(meta)["uid"]) if meta else key
    except (ValueError, KeyError, TypeError):
        return key


def decode(raw: Raw, min_side: int) -> Loaded:
    """RGB after EXIF orientation; JPEGs DCT-downscaled while the shorter side stays >= min_side."""
    if raw.data is None:
        return Loaded(raw.ref, None, raw.reason)
    try:
        return Loaded(raw.ref, decode_checked(raw.data, min_side))
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types; the reason names it
        return Loaded(raw.ref, None, f"decode_error: {type(e).__name__}: {_OBJECT_REPR.sub('', str(e))}")


def decode_checked(data: bytes, min_side: int) -> Image.Image:
    """RGB after EXIF orientation of bytes that pass `open_checked` (else `ImageRejected`); JPEGs
    DCT-downscaled while the shorter side stays >= min_side. The image decoded is the one the
    gate opened, so no other Pillow plugin ever sees the bytes."""
    from lvd.curation.embed import decode_opened

    return decode_opened(open_checked(data, TOOL_LIMITS), min_side)


def _read_bytes(path: str) -> bytes:
    """A file, or `SHARD.tar::MEMBER`, read within `TOOL_LIMITS.max_bytes` (checked first)."""
    try:
        if MEMBER_SEP not in path:
            return read_local(path, TOOL_LIMITS.max_bytes)
        shard, member = path.rsplit(MEMBER_SEP, 1)
        with tarfile.open(shard, mode="r:") as tar:
            info = tar.getmember(member)
            f = tar.extractfile(info) if info.isreg() else None
            if f is None:
                raise FileNotFoundError(f"{member} is not a file in {shard}")
            if info.size > TOOL_LIMITS.max_bytes:
                raise InputRejected("too_many_bytes", f"{info.size} bytes")
            return f.read()
    except InputRejected as e:
        raise ValueError(f"{path}: rejected: {e}") from None


def open_checked_file(path: str | os.PathLike) -> Image.Image:
    """One image file opened (lazily, not transposed) through ingest's gate; ValueError naming
    the reason when it is refused. For the tools that take a single picture (viz, segment, probe)."""
    path = os.fspath(path)
    try:
        return open_checked(_read_bytes(path), TOOL_LIMITS)
    except ImageRejected as e:
        raise ValueError(f"{path}: rejected: {e.reason}") from None


def open_image(path: str, *, min_side: int | None = None) -> Image.Image:
    """Decode one image by its `ImageRef.path`: a file, or `SHARD.tar::MEMBER`. With
    `min_side`, JPEGs may be DCT-downscaled to a shorter side >= min_side."""
    try:
        return decode_checked(_read_bytes(path), min_side or 1 << 30)  # a huge side: draft keeps full resolution
    except ImageRejected as e:
        raise ValueError(f"{path}: rejected: {e.reason}") from None
