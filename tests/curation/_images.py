"""Image encoders and LFW rows shared by the dedup and decontamination tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def lfw(i: int, side: int = 120, rgb: bool = True) -> Image.Image:
    """Row i of skimage's LFW subset (0-99 faces, 100-199 non-face patches), upscaled bicubic:
    soft, little texture."""
    import skimage.data

    img = Image.fromarray((skimage.data.lfw_subset()[i] * 255).astype(np.uint8))
    img = img.resize((side, side), Image.Resampling.BICUBIC)
    return img.convert("RGB") if rgb else img


def face_copies(img: Image.Image) -> dict[str, bytes]:
    """The copies of a face an untuned dump holds: the same file, JPEG q20, brightened x1.25
    (JPEG q90)."""
    return {"same": png(img), "q20": jpeg(img, 20), "bright": jpeg(ImageEnhance.Brightness(img).enhance(1.25), 90)}
