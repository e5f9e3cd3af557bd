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

Copy-detection benchmark (issue 11): `bench_catalog(seed)` lists ~230 distinct real originals
in five groups (whole photos, non-overlapping tiles of one photo, burst-like window pairs,
white-background product shots, aligned faces), each with its source box; the `copy_*`
functions (`BENCH_COPY_FUNCS`, one per name in `BENCH_KINDS`) draw their parameters from a
numpy Generator within the documented module-level ranges; `write_bench_dump(root)` writes
originals, one copy per kind and a few broken files plus `truth.json` (`BenchTruth`);
`split_sets` / `write_bench_sets` pick seed and eval originals for retrieval and
decontamination runs. Nothing is selected image by image: groups, grids and ranges are fixed
and every draw comes from the seed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import zlib
from dataclasses import dataclass
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


# ================================================================ copy-detection benchmark
#
# A deterministic folder dump of distinct real originals and one copy of each per kind, with
# the ground truth. Built only from images that ship with packages (scikit-image,
# scikit-learn, the Fashion-MNIST Debian package); nothing is chosen or tuned image by image.
# Build time of `write_bench_dump(root)` (213 originals x 11 kinds = 2343 copies + 213
# originals + 4 broken files, 35 MB on disk), single-threaded, measured 2026-12 on the 2-core
# dev VM (Pillow 13): 5.8 s idle, 10.5 s at load average 5; `bench_catalog` alone 1.4 s.
# Peak RSS of the whole process ~300 MB (libraries included; images are a few MB).

BENCH_KINDS = (
    "exact", "resized", "recompressed", "reencoded", "brightened", "contrast", "crop8", "crop40",
    "flipped", "overlay", "combined",
)  # fmt: skip
BENCH_GROUPS = ("photo", "tile", "burst", "product", "face")
BROKEN_KINDS = {"truncated.jpg": "corrupt", "truncated.png": "corrupt", "empty.jpg": "empty", "notes.jpg": "not_image"}
_LOSSLESS_GROUPS = ("product", "face")  # small flat-background images: PNG originals

# Whole photos (used once, whole, nowhere else).
# grass is a seamless (clone-stamped) texture and brick a wall of identical bricks: regions of
# each repeat, so their tiles share content (the copy detector links two grass tiles with 154
# RANSAC inliers at scale 0.995, two brick tiles likewise): whole only.
_BENCH_WHOLE = ("astronaut", "camera", "chelsea", "clock", "coins", "page", "text", "microaneurysms", "grass", "brick")
# Photos cut into a rows x cols grid of non-overlapping tiles (sides >= 160 px); tiles whose
# grey-level std is below _MIN_TILE_STD (the black corners of the retina scan, the empty
# background of cell) are dropped: two flat squares are the same image, not look-alikes. Low
# texture tiles above it (retina fundus with thin vessels, moon plains) stay as hard negatives.
_BENCH_TILED = {
    "retina": (7, 7), "hubble_deep_field": (4, 5), "gravel": (3, 3),
    "cell": (3, 3), "immunohistochemistry": (3, 3), "moon": (3, 3),
}  # fmt: skip
_MIN_TILE_STD = 5.0
# Photos that give one burst pair each (two overlapping windows, camera panned).
_BENCH_BURST = ("motorcycle_left", "china", "flower", "rocket", "coffee")
_BURST_MAX_OVERLAP = 0.4
_N_PRODUCTS, _PRODUCT_SIDE = 60, 112  # Fashion-MNIST test split, 28 px -> 112 px (x4)
_N_FACES, _FACE_SIDE = 40, 100  # skimage lfw_subset faces, 25 px -> 100 px (x4)
_MIN_SAMPLE_MAD = 8.0  # a product/face this close (mean |diff|, 0..255) to a picked one is skipped

# Documented parameter ranges of the copy kinds (the tests check the recorded parameters).
RESIZE_SCALE = (0.4, 0.8)
RECOMPRESS_QUALITY = (25, 60)
ENHANCE_FACTORS = ((0.6, 0.8), (1.2, 1.5))  # brightness and contrast: darker or brighter side
CROP8_AREA = (0.90, 0.94)
CROP40_AREA = (0.56, 0.64)
CROP40_ASPECT_JITTER = (0.9, 1.1)  # width fraction x r, height fraction / r
FLIP_QUALITY = 90
OVERLAY_AREA = (0.10, 0.25)
COMBINED_SCALE = (0.5, 0.8)
COMBINED_FACTORS = ((0.75, 0.9), (1.1, 1.3))
COMBINED_QUALITY = (35, 70)
_CAPTIONS = (
    "SALE -50%", "NEW IN", "www.example.com", "(c) 2024 photo agency", "BREAKING NEWS", "free shipping",
    "#tbt", "do not copy", "sample", "best price", "limited edition", "LIVE",
)  # fmt: skip


def _uniform_either(rng: np.random.Generator, ranges) -> float:
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    return float(rng.uniform(lo, hi))


def _note(params: dict | None, **kw) -> None:
    if params is not None:
        params.update(kw)


def copy_exact(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """The image itself: encoded like its original, so the file has the original's very bytes."""
    _note(params)
    return img.copy()


def copy_resized(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """Both sides scaled by one factor in RESIZE_SCALE (Lanczos)."""
    scale = float(rng.uniform(*RESIZE_SCALE))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    _note(params, scale=scale, size=list(size))
    return img.resize(size, Image.Resampling.LANCZOS)


def copy_recompressed(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> bytes:
    """JPEG at an integer quality in RECOMPRESS_QUALITY (inclusive)."""
    quality = int(rng.integers(RECOMPRESS_QUALITY[0], RECOMPRESS_QUALITY[1] + 1))
    _note(params, quality=quality)
    return _jpeg(img, quality)


def copy_reencoded(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> bytes:
    """Same pixels, another codec: lossless PNG (compress_level 1, so a PNG original's copy
    has other bytes) or WebP quality 90, each with probability 1/2."""
    if rng.integers(2) == 0:
        _note(params, format="PNG", compress_level=1)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    _note(params, format="WEBP", quality=90)
    return _webp(img)


def copy_brightened(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """Brightness x a factor in [0.6, 0.8] or [1.2, 1.5] (ENHANCE_FACTORS; side picked 1/2-1/2)."""
    factor = _uniform_either(rng, ENHANCE_FACTORS)
    _note(params, factor=factor)
    return ImageEnhance.Brightness(img).enhance(factor)


def copy_contrast(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """Contrast x a factor in [0.6, 0.8] or [1.2, 1.5] (ENHANCE_FACTORS)."""
    factor = _uniform_either(rng, ENHANCE_FACTORS)
    _note(params, factor=factor)
    return ImageEnhance.Contrast(img).enhance(factor)


def _crop_box(w: int, h: int, area: float, aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    cw = min(w, max(1, round(w * np.sqrt(area) * aspect)))
    ch = min(h, max(1, round(area * w * h / cw)))  # the height absorbs the width's rounding
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return left, top, left + cw, top + ch


def copy_crop8(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """A crop keeping an area fraction in CROP8_AREA (aspect kept), at a random position; the
    recorded `area_frac` is the kept fraction after rounding to pixels (within 0.5 / height)."""
    area = float(rng.uniform(*CROP8_AREA))
    box = _crop_box(img.width, img.height, area, 1.0, rng)
    _note(params, box=list(box), area_frac=_box_area(box) / (img.width * img.height))
    return img.crop(box)


def copy_crop40(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """A crop keeping an area fraction in CROP40_AREA, width fraction x r and height fraction / r
    with r in CROP40_ASPECT_JITTER, at a random position."""
    area = float(rng.uniform(*CROP40_AREA))
    aspect = float(rng.uniform(*CROP40_ASPECT_JITTER))
    box = _crop_box(img.width, img.height, area, aspect, rng)
    _note(params, box=list(box), area_frac=_box_area(box) / (img.width * img.height), aspect=aspect)
    return img.crop(box)


def copy_flipped(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> bytes:
    """Horizontal mirror, JPEG quality 90."""
    _note(params, quality=FLIP_QUALITY)
    return _jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), FLIP_QUALITY)


def copy_overlay(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> Image.Image:
    """Something pasted over an area fraction in OVERLAY_AREA of the image (RGB result), one of:
    - banner: a full-width band at the bottom or top, flat colour, with a caption in Pillow's
      default font;
    - sticker: a patch of a DIFFERENT image (scikit-image's logo, colour wheel, checkerboard or
      horse silhouette, none of them in the benchmark), aspect 0.75-1.33, at a random place
      (a corner half of the time), with a 2 px frame.
    The covered box is recorded; every pixel outside it is the original's."""
    from PIL import ImageDraw, ImageFont

    out = img.convert("RGB")
    w, h = out.size
    area = float(rng.uniform(*OVERLAY_AREA))
    caption = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    if rng.integers(2) == 0:
        bh = max(1, round(h * area))
        top = 0 if rng.integers(4) == 0 else h - bh  # banners are mostly at the bottom
        box = (0, top, w, top + bh)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        band = Image.new("RGB", (w, bh), colour)
        draw = ImageDraw.Draw(band)
        font = ImageFont.load_default(size=max(8, int(bh * 0.6)))
        ink = (255, 255, 255) if sum(colour) < 384 else (0, 0, 0)
        draw.text((max(2, int(w * 0.03)), bh // 2), caption, fill=ink, font=font, anchor="lm")
        out.paste(band, box[:2])
        _note(params, variant="banner", caption=caption)
    else:
        donors = _donors()
        dname = sorted(donors)[int(rng.integers(len(donors)))]
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
        pw = min(w, max(4, round(np.sqrt(area * w * h * aspect))))
        ph = min(h, max(4, round(area * w * h / pw)))
        if rng.integers(2) == 0:  # corner sticker
            corner = int(rng.integers(4))
            left = 0 if corner in (0, 2) else w - pw
            top = 0 if corner in (0, 1) else h - ph
        else:
            left, top = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        box = (left, top, left + pw, top + ph)
        patch = donors[dname].resize((pw, ph), Image.Resampling.BILINEAR)
        ImageDraw.Draw(patch).rectangle((0, 0, pw - 1, ph - 1), outline=(255, 255, 255), width=2)
        out.paste(patch, box[:2])
        _note(params, variant="sticker", donor=dname)
    _note(params, box=list(box), area_frac=_box_area(box) / (w * h))
    return out


def copy_combined(img: Image.Image, rng: np.random.Generator, params: dict | None = None) -> bytes:
    """Resize by a factor in COMBINED_SCALE, brightness x COMBINED_FACTORS, JPEG quality in
    COMBINED_QUALITY (inclusive)."""
    scale = float(rng.uniform(*COMBINED_SCALE))
    factor = _uniform_either(rng, COMBINED_FACTORS)
    quality = int(rng.integers(COMBINED_QUALITY[0], COMBINED_QUALITY[1] + 1))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    _note(params, scale=scale, size=list(size), factor=factor, quality=quality)
    small = img.resize(size, Image.Resampling.LANCZOS)
    return _jpeg(ImageEnhance.Brightness(small).enhance(factor), quality)


BENCH_COPY_FUNCS = {
    "exact": copy_exact, "resized": copy_resized, "recompressed": copy_recompressed,
    "reencoded": copy_reencoded, "brightened": copy_brightened, "contrast": copy_contrast,
    "crop8": copy_crop8, "crop40": copy_crop40, "flipped": copy_flipped, "overlay": copy_overlay,
    "combined": copy_combined,
}  # fmt: skip
assert tuple(BENCH_COPY_FUNCS) == BENCH_KINDS


def _box_area(box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


_DONOR_CACHE: dict[str, Image.Image] = {}


def _donors() -> dict[str, Image.Image]:
    """Sticker sources: graphics from scikit-image that are not benchmark originals (RGB)."""
    if not _DONOR_CACHE:
        import skimage.data

        logo = Image.fromarray(skimage.data.logo())
        white = Image.new("RGBA", logo.size, (255, 255, 255, 255))
        _DONOR_CACHE["logo"] = Image.alpha_composite(white, logo).convert("RGB")
        _DONOR_CACHE["colorwheel"] = Image.fromarray(skimage.data.colorwheel()).convert("RGB")
        _DONOR_CACHE["checkerboard"] = Image.fromarray(skimage.data.checkerboard()).convert("RGB")
        horse = skimage.data.horse()
        _DONOR_CACHE["horse"] = Image.fromarray(np.where(horse, 255, 30).astype(np.uint8)).convert("RGB")
    return _DONOR_CACHE


# ---------------------------------------------------------------- originals


@dataclass(frozen=True)
class BenchOriginal:
    """One distinct original. `box` (left, top, right, bottom) is where its pixels come from in
    `source` (a photo name, `fashion_mnist:test:INDEX` or `lfw_subset:INDEX`) of size
    `source_size`; products and faces are upscaled from their whole source."""

    name: str
    image: Image.Image
    group: str
    source: str
    box: tuple[int, int, int, int]
    source_size: tuple[int, int]
    label: str | None = None  # Fashion-MNIST class of a product
    brightness: float = 1.0  # burst windows: brightness jitter applied after the crop

    def info(self) -> dict:
        return dict(
            group=self.group, source=self.source, box=list(self.box), source_size=list(self.source_size),
            size=list(self.image.size), mode=self.image.mode, label=self.label, brightness=self.brightness,
        )  # fmt: skip


def bench_originals(seed: int = 0) -> list[tuple[str, Image.Image]]:
    """(name, image) of every benchmark original, in `bench_catalog(seed)` order."""
    return [(o.name, o.image) for o in bench_catalog(seed)]


def bench_catalog(seed: int = 0) -> list[BenchOriginal]:
    """The benchmark's distinct originals (213 for every seed), with group and source box.

    Groups (counts): photo 8 (whole photos), tile 117 (non-overlapping grid tiles of 8 photos,
    sides >= 160 px, flat tiles dropped), burst 10 (5 pairs: two windows of one photo, each
    55-62% of the width and 80-90% of the height, overlapping by at most 40% of a window's
    area, brightness x0.92-1.08 each), product 60 (Fashion-MNIST test images, 6 per class,
    upscaled to 112 px, PNG), face 40 (lfw_subset faces, upscaled to 100 px, grayscale, PNG).
    No two originals share pixels except burst partners (their overlap is the point): a
    photo is whole, tiled or burst, never two of these. `seed` picks the products, the faces
    and the burst windows; the order interleaves the groups (round robin, each group in a
    seeded order), so the first n originals cover every group.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBE7C]))
    wanted = {*_BENCH_WHOLE, *_BENCH_TILED, *_BENCH_BURST} & set(_SKIMAGE_PHOTOS)
    arrays = {name: getattr(skimage.data, name)() for name in sorted(wanted)}
    arrays["motorcycle_left"] = skimage.data.stereo_motorcycle()[0]
    sample = load_sample_images()
    arrays.update((Path(f).stem, a) for f, a in zip(sample.filenames, sample.images))
    photos = {name: Image.fromarray(np.ascontiguousarray(a)) for name, a in arrays.items()}

    groups: dict[str, list[BenchOriginal]] = {g: [] for g in BENCH_GROUPS}
    for name in _BENCH_WHOLE:
        img = photos[name]
        groups["photo"].append(BenchOriginal(name, img, "photo", name, (0, 0, *img.size), img.size))
    for name, (rows, cols) in _BENCH_TILED.items():
        img = photos[name]
        w, h = img.size
        for r in range(rows):
            for c in range(cols):
                box = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
                tile = img.crop(box)
                if float(np.asarray(tile.convert("L"), np.float32).std()) < _MIN_TILE_STD:
                    continue
                groups["tile"].append(BenchOriginal(f"{name}_r{r}c{c}", tile, "tile", name, box, img.size))
    for name in _BENCH_BURST:
        groups["burst"] += _burst_pair(name, photos[name], rng)
    groups["product"] = _products(rng)
    groups["face"] = _faces(rng)

    for g in BENCH_GROUPS:  # seeded order within each group, then round robin
        items = groups[g]
        groups[g] = [items[i] for i in rng.permutation(len(items))]
    out, depth = [], max(len(v) for v in groups.values())
    for i in range(depth):
        out += [groups[g][i] for g in BENCH_GROUPS if i < len(groups[g])]
    return out


def _burst_pair(name: str, img: Image.Image, rng: np.random.Generator) -> list[BenchOriginal]:
    w, h = img.size
    bw, bh = round(w * rng.uniform(0.55, 0.62)), round(h * rng.uniform(0.80, 0.90))
    # overlap width <= 0.4 * bw whatever dy is: dx >= 0.6 * bw, and both windows must fit
    # (bw <= 0.62 w leaves w - bw >= 0.6 * bw)
    dx = int(rng.integers(int(np.ceil((1 - _BURST_MAX_OVERLAP) * bw)), w - bw + 1))
    dy = int(rng.integers(0, h - bh + 1))
    x0 = int(rng.integers(0, w - bw - dx + 1))
    y0 = int(rng.integers(0, h - bh - dy + 1))
    boxes = [(x0, y0, x0 + bw, y0 + bh), (x0 + dx, y0 + dy, x0 + dx + bw, y0 + dy + bh)]
    if rng.integers(2):  # pan right-to-left or left-to-right, top-down or bottom-up
        boxes = [(w - b[2], b[1], w - b[0], b[3]) for b in boxes]
    if rng.integers(2):
        boxes = [(b[0], h - b[3], b[2], h - b[1]) for b in boxes]
    out = []
    for i, box in enumerate(boxes):
        factor = float(rng.uniform(0.92, 1.08))
        window = ImageEnhance.Brightness(img.crop(box)).enhance(factor)
        out.append(BenchOriginal(f"{name}_b{i}", window, "burst", name, box, img.size, brightness=factor))
    return out


def _distinct_sample(pixels: np.ndarray, candidates: np.ndarray, n: int) -> list[int]:
    """The first `n` candidates that are not within _MIN_SAMPLE_MAD of an earlier pick."""
    picked: list[int] = []
    for i in candidates:
        x = pixels[i].astype(np.float32)
        if all(np.abs(x - pixels[j]).mean() >= _MIN_SAMPLE_MAD for j in picked):
            picked.append(int(i))
            if len(picked) == n:
                return picked
    raise ValueError(f"only {len(picked)} distinct images, {n} asked")


def _products(rng: np.random.Generator) -> list[BenchOriginal]:
    from lvd.datasets import FASHION_MNIST_CLASSES

    pixels, labels = load_fashion_mnist("test")
    per_class = _N_PRODUCTS // len(FASHION_MNIST_CLASSES)
    out = []
    for k, cls in enumerate(FASHION_MNIST_CLASSES):
        idx = np.flatnonzero(labels == k)
        for i in sorted(_distinct_sample(pixels, rng.permutation(idx)[: 4 * per_class], per_class)):
            img = Image.fromarray(pixels[i]).resize((_PRODUCT_SIDE,) * 2, Image.Resampling.BICUBIC).convert("RGB")
            # Fashion-MNIST is white-on-black; a product shot is the object on white
            img = Image.fromarray(255 - np.asarray(img))
            name, source = f"product_{cls}_{i:05d}", f"fashion_mnist:test:{i}"
            out.append(BenchOriginal(name, img, "product", source, (0, 0, 28, 28), (28, 28), label=cls))
    return out


def _faces(rng: np.random.Generator) -> list[BenchOriginal]:
    import skimage.data

    faces = np.rint(skimage.data.lfw_subset()[:100] * 255).astype(np.uint8)  # first 100 are faces
    out = []
    for i in sorted(_distinct_sample(faces, rng.permutation(100), _N_FACES)):
        img = Image.fromarray(faces[i]).resize((_FACE_SIDE,) * 2, Image.Resampling.BICUBIC)
        out.append(BenchOriginal(f"face_{i:03d}", img, "face", f"lfw_subset:{i}", (0, 0, 25, 25), (25, 25)))
    return out


# ---------------------------------------------------------------- the dump and its ground truth


@dataclass
class BenchTruth:
    """Ground truth of a benchmark dump (also `root/truth.json`).

    `files`: every file of the dump by path relative to root (posix), each a dict with
    `original` (the original's name; None for broken files), `kind` ("original", a copy kind,
    or "broken"), `group` (None for broken files), and `params` (the copy's drawn parameters)
    or `reason` (the ingest rejection a broken file must get).
    `originals`: name -> `BenchOriginal.info()` plus `file` (its path relative to root).
    truth.json is a lone .json, which a folder ingest of `root` would count as one more
    (rejected) input: ingest `input_dirs(root)` instead.
    """

    seed: int
    kinds: tuple[str, ...]
    originals: dict[str, dict]
    files: dict[str, dict]

    SUBDIRS = ("originals", "copies", "broken")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BenchTruth:
        d = json.loads(text)
        return cls(seed=d["seed"], kinds=tuple(d["kinds"]), originals=d["originals"], files=d["files"])

    @classmethod
    def load(cls, root: str | Path) -> BenchTruth:
        return cls.from_json((Path(root) / "truth.json").read_text())

    def input_dirs(self, root: str | Path) -> list[Path]:
        return [Path(root) / d for d in self.SUBDIRS if (Path(root) / d).is_dir()]

    def copies_of(self, name: str) -> dict[str, str]:
        """kind -> path of every file of original `name` (its own file under "original")."""
        return {f["kind"]: p for p, f in self.files.items() if f["original"] == name}

    def counts(self) -> dict[str, dict[str, int]]:
        """group -> kind -> number of files (broken files under group "broken")."""
        out: dict[str, dict[str, int]] = {}
        for f in self.files.values():
            g = out.setdefault(f["group"] or "broken", {})
            g[f["kind"]] = g.get(f["kind"], 0) + 1
        return out


def encode_bench_original(img: Image.Image, group: str) -> bytes:
    """An original's file: PNG for products and faces, JPEG q95 otherwise. Copy kinds that
    return an image are encoded the same way (so an `exact` copy has the original's bytes)."""
    return _png(img) if group in _LOSSLESS_GROUPS else encode_original(img)


def _ext(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("unknown image encoding")


def _copy_rng(seed: int, name: str, kind: str) -> np.random.Generator:
    """One stream per (seed, original, kind): a subset of kinds or originals draws the same."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(kind.encode())])


def make_bench_copy(orig: BenchOriginal, kind: str, seed: int = 0) -> tuple[bytes, dict]:
    """(file bytes, drawn parameters) of the `kind` copy of `orig` in the dump of `seed`."""
    params: dict = {}
    out = BENCH_COPY_FUNCS[kind](orig.image, _copy_rng(seed, orig.name, kind), params)
    return (out if isinstance(out, bytes) else encode_bench_original(out, orig.group)), params


def write_bench_dump(
    root: str | Path,
    *,
    seed: int = 0,
    kinds: tuple[str, ...] = BENCH_KINDS,
    n_copied: int | None = None,
    extra_broken: bool = True,
) -> BenchTruth:
    """Write the benchmark dump under `root` and return (and write as root/truth.json) its truth.

    root/originals/<name>.jpg|png            every original of `bench_catalog(seed)`
    root/copies/<name>__<kind>.<jpg|png|webp> one copy per kind, for the first `n_copied`
                                             originals (all when None)
    root/broken/{truncated.jpg, truncated.png, empty.jpg, notes.jpg}  when `extra_broken`
    Same seed and arguments -> the same bytes in every file.
    """
    unknown = [k for k in kinds if k not in BENCH_COPY_FUNCS]
    if unknown:
        raise ValueError(f"unknown copy kinds {unknown}; choose from {BENCH_KINDS}")
    root = Path(root)
    catalog = bench_catalog(seed)
    n_copied = len(catalog) if n_copied is None else n_copied
    files: dict[str, dict] = {}
    originals: dict[str, dict] = {}

    def put(rel: str, data: bytes, **entry) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = entry

    for i, orig in enumerate(catalog):
        data = encode_bench_original(orig.image, orig.group)
        rel = f"originals/{orig.name}.{_ext(data)}"
        put(rel, data, original=orig.name, kind="original", group=orig.group, params={})
        originals[orig.name] = dict(orig.info(), file=rel)
        if i >= n_copied:
            continue
        for kind in kinds:
            data, params = make_bench_copy(orig, kind, seed)
            rel = f"copies/{orig.name}__{kind}.{_ext(data)}"
            put(rel, data, original=orig.name, kind=kind, group=orig.group, params=params)
    if extra_broken:
        jpeg = encode_original(catalog[0].image)
        png = _png(next(o for o in catalog if o.group in _LOSSLESS_GROUPS).image)
        broken = {
            "truncated.jpg": jpeg[: len(jpeg) * 3 // 5], "truncated.png": png[: len(png) // 2],
            "empty.jpg": b"", "notes.jpg": b"holiday photos, see the shared folder\n",
        }  # fmt: skip
        for fname, data in broken.items():
            put(f"broken/{fname}", data, original=None, kind="broken", group=None, reason=BROKEN_KINDS[fname])
    truth = BenchTruth(seed=seed, kinds=tuple(kinds), originals=originals, files=files)
    (root / "truth.json").write_text(truth.to_json())
    return truth


def split_sets(truth: BenchTruth, n_seeds: int = 12, n_eval: int = 6, seed: int = 0) -> tuple[list[str], list[str]]:
    """(seed originals, eval originals): disjoint names drawn from the `photo` and `tile`
    groups, among originals that have copies in the dump (so the pool holds copies of every
    eval image). Sorted; deterministic given `seed`."""
    copied = {f["original"] for f in truth.files.values() if f["kind"] not in ("original", "broken")}
    pool = sorted(n for n, o in truth.originals.items() if o["group"] in ("photo", "tile") and n in copied)
    if n_seeds + n_eval > len(pool):
        raise ValueError(f"n_seeds + n_eval = {n_seeds + n_eval} > {len(pool)} copied photo/tile originals")
    order = [pool[i] for i in np.random.default_rng([seed, 0x5E75]).permutation(len(pool))]
    return sorted(order[:n_seeds]), sorted(order[n_seeds : n_seeds + n_eval])


def write_bench_sets(
    root: str | Path,
    truth: BenchTruth,
    seeds_dir: str | Path,
    eval_dir: str | Path,
    *,
    n_seeds: int = 12,
    n_eval: int = 6,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Copy the ORIGINAL files of `split_sets(truth, n_seeds, n_eval, seed)` into `seeds_dir`
    and `eval_dir` (same file names); the dump under `root` keeps them and their copies."""
    picks = split_sets(truth, n_seeds, n_eval, seed)
    for names, out in zip(picks, (seeds_dir, eval_dir)):
        Path(out).mkdir(parents=True, exist_ok=True)
        for name in names:
            rel = truth.originals[name]["file"]
            shutil.copyfile(Path(root) / rel, Path(out) / Path(rel).name)
    return picks
