"""Pixels as every stage sees them: EXIF orientation (a broken EXIF block is ignored, never an
error) and RGB from any mode Pillow opens (alpha on white, 16-bit and float scaled to 8 bits).

Ingest, the shard writer, copy features, hygiene, embedding and the report pictures all go
through these, so an image is upright and coloured the same way in each of them."""

from __future__ import annotations

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated a quarter turn: width and height swap


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not a broken image: ignore orientation
        return 1


def apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """ImageOps.exif_transpose for an image whose EXIF is gone (we already read the tag)."""
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
    }.get(orientation)  # fmt: skip
    return img.transpose(method) if method is not None else img


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says (ImageOps.exif_transpose, minus its failure
    on a broken EXIF block: such an image is taken as it is stored, as ingest takes it).
    Decoded here, so the result outlives the file it was opened from."""
    tag = orientation(img)
    img.load()
    return apply_orientation(img, tag)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after orientation, without decoding the pixels."""
    w, h = img.size
    return (h, w) if orientation(img) in SWAPPING_ORIENTATIONS else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of a loaded image: alpha composited on white, 16-bit/float scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if (mode == "P" and "transparency" in img.info) or mode in ("PA", "LA", "La", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    return img.convert("RGB")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Pixels to 0..255: floats in [0,1] times 255; values above 255 from the 16-bit range (or
    from their max when larger); anything else is already 8-bit and only clipped."""
    is_float = np.issubdtype(x.dtype, np.floating)
    x = x.astype(np.float64)
    peak = float(x.max()) if x.size else 0.0
    if is_float and peak <= 1.0:
        x = x * 255.0
    elif peak > 255.0:
        x = x * (255.0 / (65535.0 if peak <= 65535.0 else peak))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
