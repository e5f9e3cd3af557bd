"""Real photos that ship inside scikit-image / scikit-learn, and transformed copies of them.

Used by the dedup tests and benchmarks and by `lvd demo`: real images (not synthetic noise), so
that perceptual hashes behave as they do on a web dump. Only genuine photographs are listed
(camera, microscope, telescope, scanner); drawings, logos, binary masks and stereo partners
(motorcycle_right would be a true near-duplicate of motorcycle_left) are left out.

`real_photos(crops=True)` adds the four non-overlapping quadrants of the two largest photos
(hubble_deep_field, retina) as further distinct images: they share content statistics with
each other (star fields; dark fundus on black) and so are hard negatives for dedup.

`fashion_mnist(n)` reads Fashion-MNIST from the local copy: small product shots on a flat
background, the classic case where different images get close perceptual hashes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from lvd.datasets import load_fashion_mnist

# name -> zero-argument loader returning an HxW or HxWx3 uint8 array
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "retina",
    "immunohistochemistry", "brick", "grass", "gravel", "moon", "page", "text", "clock", "cell",
    "microaneurysms",
)  # fmt: skip
_CROPPED = ("hubble_deep_field", "retina")
COPY_KINDS = ("exact", "resized", "recompressed", "reencoded", "brightened", "cropped")
ORIGINAL_QUALITY = 95  # JPEG quality of `encode_original` and of lossless-intent copies


def real_photos(*, crops: bool = False) -> list[tuple[str, Image.Image]]:
    """(name, RGB or L image) for every real photo available offline, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [(name, getattr(skimage.data, name)()) for name in _SKIMAGE_PHOTOS]
    arrays.append(("motorcycle_left", skimage.data.stereo_motorcycle()[0]))
    sample = load_sample_images()
    arrays += [(Path(f).stem, a) for f, a in zip(sample.filenames, sample.images)]
    photos = [(name, Image.fromarray(np.ascontiguousarray(a))) for name, a in arrays]
    if crops:
        photos += [q for name, img in photos if name in _CROPPED for q in _quadrants(name, img)]
    return photos


def _quadrants(name: str, img: Image.Image) -> list[tuple[str, Image.Image]]:
    w, h = img.size
    boxes = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
    return [(f"{name}_q{i}", img.crop(box)) for i, box in enumerate(boxes)]


def encode_original(img: Image.Image) -> bytes:
    """The 'original' file of a photo: JPEG at quality 95 (RGB or grayscale as given)."""
    return _jpeg(img, ORIGINAL_QUALITY)


def make_copies(img: Image.Image, *, seed: int) -> dict[str, bytes]:
    """One encoded copy of `img` per kind in COPY_KINDS; parameters drawn from `seed`.

    - exact: the very bytes of `encode_original(img)`
    - resized: both sides scaled by one factor in [0.5, 0.8] (Lanczos), JPEG q95
    - recompressed: JPEG at quality in [30, 60]
    - reencoded: lossless PNG (even seed) or WebP quality 90 (odd seed)
    - brightened: brightness x[1.1, 1.2], JPEG q95
    - cropped: each border loses 1-2.5% of its side, i.e. 2-5% per dimension, JPEG q95
    """
    rng = np.random.default_rng(seed)
    w, h = img.size
    scale = rng.uniform(0.5, 0.8)
    resized = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    left, right, top, bottom = rng.uniform(0.01, 0.025, size=4)
    box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
    reencoded = _png(img) if seed % 2 == 0 else _webp(img)
    return {
        "exact": encode_original(img),
        "resized": _jpeg(resized, ORIGINAL_QUALITY),
        "recompressed": _jpeg(img, int(rng.integers(30, 61))),
        "reencoded": reencoded,
        "brightened": _jpeg(ImageEnhance.Brightness(img).enhance(rng.uniform(1.1, 1.2)), ORIGINAL_QUALITY),
        "cropped": _jpeg(img.crop(box), ORIGINAL_QUALITY),
    }


def fashion_mnist(n: int, *, size: int = 64, seed: int = 0, split: str = "train") -> list[Image.Image]:
    """`n` distinct Fashion-MNIST images (sampled without replacement), upscaled to size x size
    RGB with bicubic filtering (the pool rejects sides < 32 px)."""
    if size < 32:
        raise ValueError(f"size={size}: ingest rejects sides < 32 px; use size >= 32")
    pixels, _ = load_fashion_mnist(split)
    if not 0 < n <= len(pixels):
        raise ValueError(f"n={n}: Fashion-MNIST {split} has {len(pixels)} images")
    pick = np.sort(np.random.default_rng(seed).choice(len(pixels), size=n, replace=False))
    return [Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB") for i in pick]


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return buf.getvalue()
