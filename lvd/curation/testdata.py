"""Hostile, corrupt and odd-but-valid inputs built from real photos, for tests and `lvd demo`.

Every generator is deterministic and writes only inside the folder (or tar) it is given.
Photos come from scikit-image and scikit-learn, which ship them, so nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
_GRAY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel")


def photo(name: str) -> np.ndarray:
    """A shipped photo as uint8 HxW or HxWxC: skimage.data names, or sklearn's china / flower."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    return getattr(skimage.data, name)()


def color_photos() -> list[np.ndarray]:
    return [photo(n) for n in (*_COLOR_PHOTOS, "china", "flower")]


def write_photo_jpegs(folder: str | os.PathLike, n: int, *, side: int = 384, seed: int = 0) -> list[str]:
    """`n` distinct ~`side`-px JPEG photos: random crops of the shipped colour photos, resized."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources, names = color_photos(), []
    for i in range(n):
        arr = sources[i % len(sources)]
        h, w = arr.shape[:2]
        crop = int(min(h, w) * rng.uniform(0.55, 1.0))
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        img = Image.fromarray(arr[y : y + crop, x : x + crop]).resize((side, side), Image.Resampling.BILINEAR)
        name = f"photo_{i:05d}.jpg"
        img.save(folder / name, "JPEG", quality=int(rng.integers(80, 95)))
        names.append(name)
    return names


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming_size(width: int, height: int) -> bytes:
    """A decompression-bomb-shaped PNG: the header claims width x height, the file is ~70 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def write_bad_inputs(folder: str | os.PathLike) -> dict[str, str]:
    """Write one file per reachable rejection; returns relative file name -> expected reason."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _encode(Image.fromarray(photo("chelsea")), "JPEG", quality=90)
    png = _encode(Image.fromarray(photo("coffee")), "PNG")
    files = {
        "empty.jpg": (b"", "empty"),
        "notes.txt": (b"these are notes, not a picture\n" * 20, "not_image"),
        "garbage.bin": (np.random.default_rng(0).bytes(4096), "not_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "truncated_tail.jpg": (jpeg[:-2], "corrupt"),  # only the EOI marker is missing
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "bad_header.png": (png[:8] + b"\x00\x00\x00\x0dXXXX" + png[16:200], "corrupt"),
        "bad_header.jpg": (b"\xff\xd8\xff\xc0\x00\x02" + b"\x13" * 300, "corrupt"),
        "narrow.png": (_encode(Image.fromarray(photo("astronaut")[:500, :20]), "PNG"), "too_small"),
        "bomb.png": (png_claiming_size(30_000, 30_000), "too_large"),  # > 2x Pillow limit: its error
        "bomb_soft.png": (png_claiming_size(10_000, 10_000), "too_large"),  # our max_pixels check
        "lab.tif": (_encode(Image.fromarray(photo("rocket")).convert("LAB"), "TIFF"), "unsupported_mode"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def odd_valid_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Odd-but-valid encodings: file name -> (bytes, expected upright (width, height))."""
    rgb = {n: Image.fromarray(photo(n)) for n in (*_COLOR_PHOTOS, "china", "flower")}
    gray = {n: Image.fromarray(photo(n)) for n in _GRAY_PHOTOS}
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1)))
    gray16 = Image.fromarray(photo("camera").astype(np.uint16) * 257)
    palette = rgb["chelsea"].quantize(64)
    coffee = rgb["coffee"].rotate(90, expand=True)  # stored turned CCW; orientation 6 = turn CW to view
    frames = [rgb["china"].resize((320, 214)), rgb["flower"].resize((320, 214))]
    out = {
        "cmyk.jpg": (_encode(rgb["astronaut"].convert("CMYK"), "JPEG", quality=90), (512, 512)),
        "gray16.png": (_encode(gray16, "PNG"), (512, 512)),
        "palette_transparent.png": (_encode(palette, "PNG", transparency=0), (451, 300)),
        "rgba.png": (_encode(rgb["rocket"].convert("RGBA"), "PNG"), (640, 427)),
        "la.png": (_encode(Image.merge("LA", (gray["moon"], alpha)), "PNG"), (512, 512)),
        "gray.png": (_encode(gray["coins"], "PNG"), (384, 303)),
        "gray.jpg": (_encode(gray["brick"], "JPEG", quality=90), (512, 512)),
        "photo.webp": (_encode(rgb["hubble_deep_field"], "WEBP", quality=85), (1000, 872)),
        "photo.bmp": (_encode(rgb["immunohistochemistry"], "BMP"), (512, 512)),
        "photo.tif": (_encode(gray["grass"], "TIFF", compression="tiff_lzw"), (512, 512)),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100), (320, 214)),
        "exif6.jpg": (_encode(coffee, "JPEG", quality=90, exif=_exif_orientation(6)), (600, 400)),
        "progressive.jpg": (_encode(rgb["flower"], "JPEG", quality=90, progressive=True), (640, 427)),
        "bilevel.png": (_encode(Image.fromarray(photo("gravel")).convert("1"), "PNG"), (512, 512)),
    }
    return out


def write_odd_valid_inputs(folder: str | os.PathLike) -> list[str]:
    """Write every odd-but-valid encoding; returns the relative file names (all should be accepted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = odd_valid_images()
    for name, (data, _) in images.items():
        (folder / name).write_bytes(data)
    return list(images)


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.mode = kind, len(data), 1_700_000_000, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def write_hostile_tar(path: str | os.PathLike) -> dict[str, str]:
    """A tar with path-escaping names, links and special members; returns source -> expected
    `accepted` or rejection reason. Reading it must never create a file anywhere."""
    path = os.path.abspath(path)
    jpeg = {n: _encode(Image.fromarray(photo(n)), "JPEG", quality=85) for n in ("astronaut", "rocket", "coffee")}
    members = [
        (_member("../escape.jpg", data=jpeg["astronaut"]), "accepted"),
        (_member("/abs/x.jpg", data=jpeg["rocket"]), "accepted"),
        (_member("sample.jpg", data=jpeg["coffee"]), "accepted"),
        (_member("sample.json", data=json.dumps({"caption": "a cup of coffee"}).encode()), None),
        (_member("sample.txt", data=b"coffee"), None),
        (_member("evil_link.jpg", tarfile.SYMTYPE, linkname="../../../etc/passwd"), "tar_link"),
        (_member("hard.jpg", tarfile.LNKTYPE, linkname="sample.jpg"), "tar_link"),
        (_member("pipe", tarfile.FIFOTYPE), "tar_special"),
        (_member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), "tar_special"),
        (_member("empty.jpg"), "empty"),
    ]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for (info, data), _ in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return {f"{path}::{info.name}": want for (info, _), want in members if want is not None}
