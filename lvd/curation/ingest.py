"""Ingest: decode, validate and hash every raw item of a partition; one record per input.

Checks run cheapest first: `empty` -> `too_many_bytes` (more than `IngestConfig.max_bytes`;
the source readers refuse such inputs before reading them) -> `not_image` (Pillow cannot
identify it among `IngestConfig.formats`; bytes that start with a known image signature but
fail to parse are `corrupt` instead) -> `too_large` (from the header, before any decoding:
pixel count above `max_pixels`, or decoded size above `max_decoded_bytes`, see `decoded_bytes`;
Pillow's own DecompressionBombError counts too) -> `too_small` (shorter side after EXIF orientation)
-> `unsupported_mode` -> `corrupt` (any decode failure, truncation included: Pillow's
LOAD_TRUNCATED_IMAGES must stay False; `ingest_item` refuses to run otherwise). Only the data the first
frame needs is validated: a GIF cut inside a later frame, or a PNG missing only its IEND
chunk, is accepted, since the image it shows is complete.

Speed: JPEGs are decoded with Pillow's draft mode straight to a small grayscale image
(libjpeg's DCT scaling, 1/2..1/8 size, shorter side kept >= `IngestConfig.draft_side`).
libjpeg still entropy-decodes every scan, so a truncated file still fails. Other formats are
decoded fully, converted to RGB (alpha composited on white, 16-bit scaled to 8 bits) and
reduced. The hashes are then imagehash's pHash and dHash of that small image, plus the 256-bit
pHash (`phash256`, hash_size=16) and a 16x16 grid of cell means (`thumb16`), which dedup uses
to verify candidates; all computed as matrix products (`hash_bits`, `thumbnail`): within a
few bits of hashing the full-size decode. For brightness / contrast copies: the pHash-256 of
the equalised image (`nphash256`), of the image clipped as if brightened x1.1..x1.75
(`cphash256`, 7 codes) and which thumbnail cells hold a clipped pixel (`sat16`):
`phash.brightness_codes`, `phash.saturation_masks`.

Hash bit order: imagehash's boolean array flattened row-major, first bit most significant, so
`phash == int(str(imagehash.phash(img)), 16)` and `phash256 == np.packbits(
imagehash.phash(img, 16).hash.ravel()).tobytes()`, up to a bit or two of rounding.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile

from lvd.curation import hygiene
from lvd.curation.phash import (
    CLIP_FACTORS,
    PHASH256_SIZE,
    THUMB_SIDE,
    brightness_codes,
    hash_bits,
    saturation_masks,
    thumbnail,
    to_uint,
)  # fmt: skip
from lvd.curation.pixels import SWAPPING_ORIENTATIONS, apply_orientation, orientation, to_rgb
from lvd.curation.sources import Partition, RawItem, SourceLimits, iter_items
from lvd.curation.sources.raw import DEFAULT_MAX_BYTES, real_roots

INGEST_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("uid", pa.string()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("nbytes", pa.int64()),
        pa.field("phash", pa.uint64()),
        pa.field("dhash", pa.uint64()),
        pa.field("phash256", pa.binary(32)),
        pa.field("thumb16", pa.binary(THUMB_SIDE**2)),
        pa.field("nphash256", pa.binary(32)),  # pHash-256 of the equalised image (phash.brightness_codes)
        pa.field("cphash256", pa.binary(32 * len(CLIP_FACTORS))),  # ... of it clipped as if brightened
        pa.field("sat16", pa.binary(2 * THUMB_SIDE**2 // 8)),  # thumb16 cells with a light / dark clipped pixel
        pa.field("meta", pa.string()),
        pa.field("detail", pa.string()),  # JSON: a hygiene rejection's rule / value, an image's face boxes
    ]
)
BLOB_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("data", pa.binary(), nullable=False)])

Image.init()  # registers every plugin, so Image.ID lists what this Pillow build can open
# AVIF only exists in newer Pillow builds; JPEG also opens MPO (multi-picture camera files).
WEB_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.ID)
# Modes `to_rgb` knows how to turn into RGB faithfully. LAB/HSV need a colour-managed
# conversion Pillow does not do (its LAB->RGB just relabels channels), so they are rejected.
SUPPORTED_MODES = frozenset(
    ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "RGBA", "RGBa", "LA", "La", "PA", "I", "F"]
    + ["I;16", "I;16L", "I;16B", "I;16N"]
)
# File signatures: bytes starting like this are an image that failed to parse -> `corrupt`.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    min_side: int = 32  # shorter side below this -> too_small
    max_pixels: int = 89_478_485  # width*height above this -> too_large (Pillow's default bomb limit)
    hash_size: int = 8  # imagehash hash_size; hash_size**2 bits must fit the uint64 columns
    # Shorter side the reduced decode keeps (JPEG draft target; box reduction stops at 2x this).
    # pHash-256 reads a 64x64 squash, so below 64 it would hash upsampled pixels. Hashing is
    # matmuls, so 64 vs 128 is decode cost only (benchmarks/ingest.py --draft-side).
    draft_side: int = 64
    formats: tuple[str, ...] = WEB_FORMATS  # Pillow format ids tried when identifying bytes
    # Per-input memory bounds (docs/architecture.md, "Trust boundary"): bytes of one input,
    # checked before reading it; decoded size from the header (`decoded_bytes`), checked before
    # decoding. 256 MiB holds an 8192x8192 RGB(A) image (Pillow stores 4 bytes a pixel) and any
    # 8-bit grayscale image within max_pixels; a 9400x9400 RGBA PNG (337 MiB) is too_large.
    max_bytes: int = DEFAULT_MAX_BYTES
    max_decoded_bytes: int = 256 << 20
    # Where paths named inside inputs (Parquet path cells, symlinks in folders) may point besides
    # the dump's own folder (--allow-root), and whether URIs in data are read (--allow-remote).
    allow_roots: tuple[str, ...] = ()
    allow_remote: bool = False
    # URL lists, quality filters, NSFW model, face detection (lvd.curation.hygiene); None: off
    hygiene: hygiene.HygieneConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hygiene, dict):
            object.__setattr__(self, "hygiene", hygiene.HygieneConfig(**self.hygiene))
        object.__setattr__(self, "allow_roots", real_roots(self.allow_roots))
        object.__setattr__(self, "formats", tuple(self.formats))
        if self.max_bytes < 1 or self.max_decoded_bytes < 1:
            raise ValueError(f"max_bytes={self.max_bytes}, max_decoded_bytes={self.max_decoded_bytes}: use >= 1")
        if self.min_side < 1:
            raise ValueError(f"min_side={self.min_side}: set min_side >= 1")
        if self.max_pixels < self.min_side**2:
            raise ValueError(f"max_pixels={self.max_pixels} is below min_side**2: raise max_pixels")
        hard = Image.MAX_IMAGE_PIXELS
        if hard is not None and self.max_pixels > 2 * hard:
            raise ValueError(
                f"max_pixels={self.max_pixels} exceeds Pillow's hard limit 2*Image.MAX_IMAGE_PIXELS="
                f"{2 * hard}: lower max_pixels or raise PIL.Image.MAX_IMAGE_PIXELS first"
            )
        if not 2 <= self.hash_size <= 8:
            raise ValueError(f"hash_size={self.hash_size}: use 2..8 so hash_size**2 bits fit in uint64")
        if self.draft_side < 4 * PHASH256_SIZE:
            raise ValueError(
                f"draft_side={self.draft_side}: use >= {4 * PHASH256_SIZE} (the 256-bit pHash reads 64x64 pixels)"
            )
        unknown = [f for f in self.formats if f not in Image.ID]
        if unknown:
            raise ValueError(f"formats {unknown} are not Pillow format ids; choose from {sorted(Image.ID)}")

    def source_limits(self) -> SourceLimits:
        return SourceLimits(max_bytes=self.max_bytes, allow_roots=self.allow_roots, allow_remote=self.allow_remote)


@dataclass
class IngestOutput:
    records: pa.Table  # INGEST_SCHEMA, one row per input of the partition
    blobs: pa.Table  # BLOB_SCHEMA, raw bytes of accepted images, one row per uid, sorted by uid


class ImageRejected(Exception):
    """Bytes refused as an image; `reason` is a rejection reason, `fields` what was learnt."""

    def __init__(self, reason: str, **fields) -> None:
        super().__init__(reason)
        self.reason, self.fields = reason, fields


_Reject = ImageRejected


def ingest_partition(partition: Partition, cfg: IngestConfig) -> IngestOutput:
    records, blobs = [], {}
    for item in iter_items(partition, cfg.source_limits()):
        record, data = ingest_item(item, cfg)
        records.append(record)
        if data is not None:
            blobs.setdefault(record["uid"], data)
    return IngestOutput(records=pa.Table.from_pylist(records, schema=INGEST_SCHEMA), blobs=blob_table(blobs))


def blob_table(blobs: dict[str, bytes]) -> pa.Table:
    """BLOB_SCHEMA rows of uid -> bytes, sorted by uid (`rundir.read_blobs` reads uid ranges)."""
    uids = sorted(blobs)
    return pa.table({"uid": uids, "data": [blobs[u] for u in uids]}, schema=BLOB_SCHEMA)


def ingest_item(item: RawItem, cfg: IngestConfig) -> tuple[dict, bytes | None]:
    """(record in INGEST_SCHEMA, bytes to keep or None when rejected)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # process-global Pillow switch; someone else may flip it
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: set it False, or truncated files pass")
    data = item.data
    record = dict(
        source=item.source, status="rejected", reason=item.error, format=None, width=None, height=None,
        uid=hashlib.sha256(data).hexdigest() if data is not None else None,
        nbytes=len(data) if data is not None else None, phash=None, dhash=None, phash256=None, thumb16=None, nphash256=None,
        cphash256=None, sat16=None,
        meta=json.dumps(item.meta, sort_keys=True, default=str), detail=None,
    )  # fmt: skip
    if item.error is not None:
        return record, None
    if cfg.hygiene is not None and (blocked := hygiene.check_source(item.meta, cfg.hygiene)):
        record.update(reason=blocked[0], detail=json.dumps(blocked[1], sort_keys=True))
        return record, None
    try:
        with warnings.catch_warnings():
            # Pillow warns about corrupt EXIF / truncated TIFF strips (classified here anyway)
            # and about large images (our own max_pixels check replaces that warning)
            warnings.simplefilter("ignore")
            record.update(_decode_and_hash(data, cfg))
    except _Reject as rej:
        record.update(reason=rej.reason, **rej.fields)
        return record, None
    if cfg.hygiene is not None and cfg.hygiene.decodes:  # NSFW score, face boxes: a second decode
        reason, found = hygiene.check_decoded(data, (record["width"], record["height"]), cfg.hygiene)
        record.update(detail=json.dumps(found, sort_keys=True))
        if reason is not None:
            record.update(reason=reason)
            return record, None
    record.update(status="accepted", reason=None)
    return record, data


def open_checked(data: bytes | None, cfg: IngestConfig) -> Image.Image:
    """Open (not decode) `data` as an image within `cfg`'s limits, or raise `ImageRejected`:
    `empty`, `too_many_bytes`, `not_image` / `corrupt` (only `cfg.formats` are tried),
    `too_large` (pixels or `decoded_bytes` from the header). The one gate for ingest and lvd/tools."""
    if not data:
        raise _Reject("empty")
    if len(data) > cfg.max_bytes:
        raise _Reject("too_many_bytes")
    img = _open(data, cfg)
    info = dict(format=img.format, width=img.size[0], height=img.size[1])
    if img.size[0] * img.size[1] > cfg.max_pixels or decoded_bytes(img) > cfg.max_decoded_bytes:
        raise _Reject("too_large", **info)
    return img


def decoded_bytes(img: Image.Image) -> int:
    """Memory the full decode takes, from the header: width x height x bytes a pixel as Pillow
    stores it (1 for 1/L/P, 2 for I;16*, 4 for I/F and for every multi-band mode: RGB included)."""
    bands = len(img.getbands())
    per_pixel = 4 if bands > 1 or img.mode in ("I", "F") else 2 if img.mode.startswith("I;16") else 1
    return img.size[0] * img.size[1] * per_pixel


def _decode_and_hash(data: bytes | None, cfg: IngestConfig) -> dict:
    img = open_checked(data, cfg)
    info = dict(format=img.format)
    width, height = img.size
    info.update(width=width, height=height)
    tag = orientation(img)
    if tag in SWAPPING_ORIENTATIONS:
        width, height = height, width
        info.update(width=width, height=height)
    if min(width, height) < cfg.min_side:
        raise _Reject("too_small", **info)
    if img.mode not in SUPPORTED_MODES:
        raise _Reject("unsupported_mode", **info)
    small = _small_gray(img, max(cfg.draft_side, cfg.hash_size * 4))
    small = apply_orientation(small, tag)
    if cfg.hygiene is not None and (bad := hygiene.check_thumb(small, width, height, cfg.hygiene)):
        raise _Reject(bad[0], **info, detail=json.dumps(bad[1], sort_keys=True))
    x_HW = np.asarray(small, dtype=np.float64)  # one conversion for all hashes
    phash, dhash, phash256 = hash_bits(x_HW, cfg.hash_size)
    equalised = brightness_codes(x_HW)
    return dict(
        info, phash=to_uint(phash), dhash=to_uint(dhash), phash256=np.packbits(phash256).tobytes(),
        thumb16=thumbnail(x_HW).tobytes(), nphash256=equalised[0].tobytes(), cphash256=equalised[1:].tobytes(),
        sat16=np.packbits(saturation_masks(x_HW)).tobytes(),
    )  # fmt: skip


def _open(data: bytes, cfg: IngestConfig) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=cfg.formats)
    except Image.DecompressionBombError:
        raise _Reject("too_large") from None
    except Exception:  # Pillow raises many types for unparsable headers
        is_image = data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        raise _Reject("corrupt" if is_image else "not_image") from None


def _small_gray(img: Image.Image, side: int) -> Image.Image:
    """Decode the whole image (validating it) into a grayscale image with both sides >= `side`."""
    if img.format in ("JPEG", "MPO"):
        img.draft("L", (side, side))  # DCT-domain downscale; YCbCr->RGB skipped (CMYK: scale only)
    try:
        img.load()
        small = img if img.mode == "L" else to_rgb(img).convert("L")
    except Image.DecompressionBombError:
        raise _Reject("too_large", format=img.format) from None
    except Exception:
        raise _Reject("corrupt", format=img.format) from None
    factor = min(small.size) // (2 * side)
    return small.reduce(factor) if factor >= 2 else small  # box filter: cheap, keeps the hash stable
