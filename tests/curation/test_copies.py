"""Real photos and their transformed copies: what each kind of copy actually is."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos


@pytest.fixture(scope="module")
def photos():
    return real_photos(crops=True)


def test_real_photos_are_distinct_real_images(photos):
    names = [n for n, _ in photos]
    assert len(names) == len(set(names)) >= 25
    assert {"astronaut", "coffee", "china", "flower", "motorcycle_left", "retina_q3"} <= set(names)
    for name, img in photos:
        assert img.mode in ("RGB", "L"), name
        assert min(img.size) >= 64, name
    arrays = {n: np.asarray(img.convert("L").resize((32, 32))) for n, img in photos}
    assert len({a.tobytes() for a in arrays.values()}) == len(arrays)


def test_copy_kinds(photos):
    name, img = photos[0]
    w, h = img.size
    copies = make_copies(img, seed=3)
    assert tuple(copies) == COPY_KINDS
    assert copies["exact"] == encode_original(img)
    assert make_copies(img, seed=3) == copies  # deterministic
    decoded = {k: Image.open(io.BytesIO(v)) for k, v in copies.items()}
    rw, rh = decoded["resized"].size
    assert 0.5 * w - 1 <= rw <= 0.8 * w + 1 and abs(rw / w - rh / h) < 0.01
    cw, ch = decoded["cropped"].size
    assert 0.95 * w - 1 <= cw <= 0.98 * w + 1 and 0.95 * h - 1 <= ch <= 0.98 * h + 1
    assert decoded["recompressed"].format == "JPEG" and len(copies["recompressed"]) < len(copies["exact"])
    assert decoded["reencoded"].format == "WEBP"  # odd seed
    assert Image.open(io.BytesIO(make_copies(img, seed=2)["reencoded"])).format == "PNG"
    bright = np.asarray(decoded["brightened"].convert("L"), float).mean()
    orig = np.asarray(decoded["exact"].convert("L"), float).mean()
    assert 1.05 < bright / orig < 1.25


def test_fashion_mnist_upscaled_and_distinct():
    imgs = fashion_mnist(50, size=64, seed=1)
    assert len(imgs) == 50 and all(i.size == (64, 64) and i.mode == "RGB" for i in imgs)
    assert len({i.tobytes() for i in imgs}) == 50
    with pytest.raises(ValueError, match="size >= 32"):
        fashion_mnist(5, size=28)
