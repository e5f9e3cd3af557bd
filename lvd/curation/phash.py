"""Perceptual hashes and thumbnails of a small grayscale image, as cached matrix products.

imagehash's pHash (Lanczos squash to 4*hash_size square, DCT-II, low block > median) and dHash
(Lanczos to (hash_size+1) x hash_size, neighbour differences), plus a 16x16 grid of cell means.
Each resize and DCT is folded into one [k, side] matrix per axis, cached per image side, so a
hash costs two small matmuls instead of Pillow resizes (which cost more than ingest's draft
decode saves: benchmarks/ingest.py). Bits match imagehash on the same image up to Pillow's
8-bit rounding inside its resize (a bit or two near the median).

For brightness / contrast copies (dedup's equalised channel): `brightness_codes` (pHash-256 of
a clip-stable equalisation, `stable_equalise`, of the image and of it clipped as if brightened
x1.1..x1.75) and `saturation_masks` (which thumbnail cells hold a clipped pixel).
`equalise` (mid-ranks) stays for the copy features' hashes (`localfeat`).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

PHASH256_SIZE = 16  # imagehash hash_size of ingest's `phash256` column: 16x16 = 256 bits
THUMB_SIDE = 16  # ingest's `thumb16`: 16x16 grayscale cell means, uint8 row-major (256 bytes)
# Top clip levels (max / f) of the `cphash256` codes: brightness x1.1..x1.75 (brightness_codes).
# Steps of ~7%: a copy's code moves ~20 bits for 0.05 of clip factor (an untuned dump's product
# brightened x~1.24: 12 bits from the x1.25 code, 34 and 32 from the x1.15 and x1.3 codes of
# the earlier 4-code grid, so no candidate at radius 24).
CLIP_FACTORS = (1.1, 1.18, 1.26, 1.35, 1.45, 1.6, 1.75)
EQUALISE_MERGE = 4  # levels this close to the darkest / brightest one join it (stable_equalise)
SATURATED = (5, 250)  # gray levels counted as clipped dark / light (saturation_masks)


def hash_bits(gray: Image.Image | np.ndarray, hash_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pHash, dHash, 256-bit pHash) bits of a grayscale image: bool [hash_size**2] x2, [256].

    imagehash's recipes (Lanczos squash to 4*hash_size square then DCT-II low block > median;
    Lanczos to (hash_size+1) x hash_size then neighbour differences) with each resize and DCT
    folded into one cached [k, side] matrix per axis, so a hash is two small matmuls instead
    of Pillow resizes, which cost more than the draft decode saves. Same as imagehash on
    `gray` up to Pillow's 8-bit rounding inside its resize (a bit or two near the median).
    """
    x_HW = np.asarray(gray, dtype=np.float64)
    h, w = x_HW.shape
    return (
        _phash(x_HW, hash_size),
        _dhash(x_HW, hash_size),
        _phash(x_HW, PHASH256_SIZE),
    )


def phash_bits(x_HW: np.ndarray, hash_size: int) -> np.ndarray:
    """bool [hash_size**2]: imagehash's pHash bits of a grayscale array (as in `hash_bits`)."""
    return _phash(np.asarray(x_HW, dtype=np.float64), hash_size)


def equalise(x_HW: np.ndarray) -> np.ndarray:
    """float64 histogram-equalised copy of a grayscale image (levels rounded to 0..255, each
    mapped to its mid-rank in [0, 255]). Monotone brightness and contrast changes leave it
    unchanged, up to the levels that clipping merged: the input of the `nphash256` column, the
    hash channel that finds strongly brightened or contrast-changed copies."""
    levels = np.clip(np.rint(np.asarray(x_HW, dtype=np.float64)), 0, 255).astype(np.intp)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(counts)
    mid = (cdf - counts / 2) / max(cdf[-1], 1.0)
    return (mid * 255.0)[levels]


def stable_equalise(x_HW: np.ndarray, merge: int = EQUALISE_MERGE) -> np.ndarray:
    """float64 equalised copy of a grayscale image that clipping leaves alone: the input of the
    `nphash256` codes (`brightness_codes`).

    Levels within `merge` of the darkest / brightest level present join it (JPEG ringing
    around a clipped area); the brightest level maps to its lower rank and the darkest to its
    upper rank, other levels to their mid-rank. A brightening copy clips light pixels into the
    white mass; with mid-ranks the mass's value would move with its size (a product shot's
    white background, ~0.6 -> ~0.7), with its lower rank it stays where the pixels below it
    end, and those keep their ranks (benchmarks/dedup_quality.py: brightened 81 -> 91% of
    copies within 20 bits)."""
    levels = _levels(x_HW)
    return _equalise_table(np.bincount(levels.ravel(), minlength=256), merge)[levels]


def brightness_codes(x_HW: np.ndarray) -> np.ndarray:
    """uint8 [1 + len(CLIP_FACTORS), 32]: pHash-256 of `stable_equalise(x)` (ingest column
    `nphash256`), then of the image with its top clipped at max / f for each f in CLIP_FACTORS
    (column `cphash256`): what x looks like brightened by f, equalised. A copy brightened by
    ~f lands near one of its original's clipped codes, where the plain equalised codes may be
    40-100 bits apart (light garments fading into a white background). Each clipped image's
    equalisation is a 256-entry table of the one histogram (levels above the clip join it)."""
    levels = _levels(x_HW)
    counts = np.bincount(levels.ravel(), minlength=256)
    tables = [_equalise_table(counts, EQUALISE_MERGE)]
    top = float(levels.max())
    for f in CLIP_FACTORS:
        clip = int(np.rint(top / f))  # = rint(min(x, top / f)) for the integer levels here
        below = np.minimum(np.arange(256), clip)
        tables.append(_equalise_table(np.bincount(below, weights=counts, minlength=256), EQUALISE_MERGE)[below])
    return np.packbits(_phash_batch(np.stack([t[levels] for t in tables]), PHASH256_SIZE), axis=1)


def _phash_batch(x_KHW: np.ndarray, hash_size: int) -> np.ndarray:
    """bool [K, hash_size**2]: `_phash` of K images of one shape, in one batched matmul."""
    k, h, w = x_KHW.shape
    low = (_dct_lanczos(hash_size, h) @ x_KHW @ _dct_lanczos(hash_size, w).T).reshape(k, -1)
    low = np.round(low, 6)
    ordered, half = np.sort(low, axis=1), low.shape[1] // 2
    mid = ordered[:, half] if low.shape[1] % 2 else (ordered[:, half - 1] + ordered[:, half]) / 2
    return low > mid[:, None]


def _levels(x_HW: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x_HW, dtype=np.float64)), 0, 255).astype(np.intp)


def _equalise_table(counts: np.ndarray, merge: int) -> np.ndarray:
    """float64 [256]: `stable_equalise`'s value of each gray level, from the level counts."""
    present = np.flatnonzero(counts)
    lo, hi = present[0], present[-1]
    source = np.arange(256)
    source = np.where(source >= hi - merge, hi, np.where(source <= lo + merge, lo, source))
    counts = np.bincount(source, weights=counts, minlength=256)
    cdf = np.cumsum(counts)
    total = max(cdf[-1], 1.0)
    rank = cdf - counts / 2
    rank[hi], rank[lo] = cdf[hi] - counts[hi], cdf[lo]
    if lo == hi:
        rank[lo] = total / 2
    return (rank / total * 255.0)[source]


def saturation_masks(x_HW: np.ndarray) -> np.ndarray:
    """bool [2, 256]: the cells of the 16x16 thumbnail grid holding a pixel >= SATURATED[1]
    (row 0) or <= SATURATED[0] (row 1), as ingest's `sat16` column. A brightness or contrast
    change is affine on pixels it does not clip, so cells free of saturated pixels in both
    images must fit affinely (dedup.unclipped_residual); cell means alone cannot tell a
    half-clipped cell from a darker one."""
    levels = np.rint(np.asarray(x_HW, dtype=np.float64))
    rows = (_area_rows(THUMB_SIDE, levels.shape[0]) > 0).astype(np.float64)
    cols = (_area_rows(THUMB_SIDE, levels.shape[1]) > 0).astype(np.float64)
    hi = rows @ (levels >= SATURATED[1]).astype(np.float64) @ cols.T
    lo = rows @ (levels <= SATURATED[0]).astype(np.float64) @ cols.T
    return np.stack([hi.ravel() > 0, lo.ravel() > 0])


def _phash(x_HW: np.ndarray, hash_size: int) -> np.ndarray:
    low = _dct_lanczos(hash_size, x_HW.shape[0]) @ x_HW @ _dct_lanczos(hash_size, x_HW.shape[1]).T
    low = np.round(low, 6).ravel()  # float noise of a flat image's zero coefficients must tie, not flip
    ordered, half = np.sort(low), len(low) // 2  # np.median without its overhead
    mid = ordered[half] if len(low) % 2 else (ordered[half - 1] + ordered[half]) / 2
    return low > mid


def _dhash(x_HW: np.ndarray, hash_size: int) -> np.ndarray:
    # Pillow resizes horizontally then vertically, clipping and rounding to 8 bits after each
    # pass; doing the same makes flat neighbours tie (bit 0) as in imagehash, not flip on ringing
    rows_Hw = np.clip(np.rint(x_HW @ _lanczos_rows(hash_size + 1, x_HW.shape[1]).T), 0, 255)
    grid = np.clip(np.rint(_lanczos_rows(hash_size, x_HW.shape[0]) @ rows_Hw), 0, 255)
    return (grid[:, 1:] > grid[:, :-1]).ravel()


@functools.lru_cache(maxsize=4096)
def _dct_lanczos(k: int, n: int) -> np.ndarray:
    """[k, n]: Lanczos resample n -> 4k samples, then the first k rows of the DCT-II."""
    side = 4 * k
    dct = np.cos(np.pi * np.arange(k)[:, None] * (2 * np.arange(side)[None] + 1) / (2 * side))
    return dct @ _lanczos_rows(side, n)


@functools.lru_cache(maxsize=4096)
def _lanczos_rows(m: int, n: int) -> np.ndarray:
    """[m, n] weights of Pillow's Lanczos (a=3) downscale of n samples to m, in float."""
    scale = n / m  # < 1 upsamples (tiny images): the kernel keeps its unit width then
    center = (np.arange(m)[:, None] + 0.5) * scale
    t = (np.arange(n)[None] + 0.5 - center) / max(scale, 1.0)
    w = np.where(np.abs(t) < 3.0, np.sinc(t) * np.sinc(t / 3.0), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def thumbnail(gray: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [16, 16]: mean gray level of each cell of a 16x16 grid (fractional overlaps).

    Dedup's last check: global hashes cannot see a pocket or a print on an otherwise identical
    product shot, these cell means can (benchmarks/dedup_quality.py)."""
    x_HW = np.asarray(gray, dtype=np.float64)
    cells = _area_rows(THUMB_SIDE, x_HW.shape[0]) @ x_HW @ _area_rows(THUMB_SIDE, x_HW.shape[1]).T
    return np.clip(np.rint(cells), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4096)
def _area_rows(m: int, n: int) -> np.ndarray:
    """[m, n] weights averaging n samples into m equal cells (fractional overlaps)."""
    lo = np.arange(m)[:, None] * (n / m)
    j = np.arange(n)[None]
    return np.clip(np.minimum(lo + n / m, j + 1) - np.maximum(lo, j), 0.0, None) / (n / m)


def to_uint(bits: np.ndarray) -> int:
    """Bits (first most significant) as an unsigned int, as imagehash's hex reads."""
    bits = bits.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big") >> ((8 - bits.size % 8) % 8)
