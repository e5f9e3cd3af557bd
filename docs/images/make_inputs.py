"""Write the inputs of the README's `lvd viz` / `lvd segment` pictures into OUT (default
/tmp/lvd-readme): real images only (scikit-image, Fashion-MNIST test split), no model involved.

- coffee.png: scikit-image's coffee photo.
- pasted.png + pasted-mask.png: scikit-image's chelsea pasted onto flat grey, and its rectangle.
- fmnist-sneaker.png + fmnist-sneaker-mask.png (its pixels brighter than 20), fmnist-boot.png:
  Fashion-MNIST test products, 28 px upscaled to 112.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from lvd.datasets import load_fashion_mnist

SIDE = 112  # 28 px products upscaled 4x: 8 x 8 patches (the tiny recipe trains at 56 px, 4 x 4)
SNEAKER, BOOT = 7, 9


def _product(images: np.ndarray, labels: np.ndarray, label: int, n: int) -> Image.Image:
    """The n-th test product of class `label`, RGB, SIDE x SIDE (bicubic)."""
    pixels = images[np.flatnonzero(labels == label)[n]]
    return Image.fromarray(pixels).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.coffee()).save(out / "coffee.png")
    canvas = Image.new("RGB", (448, 336), (128, 128, 128))
    canvas.paste(Image.fromarray(skimage.data.chelsea()).resize((224, 168), Image.Resampling.BICUBIC), (112, 84))
    canvas.save(out / "pasted.png")
    mask = np.zeros((336, 448), np.uint8)
    mask[84:252, 112:336] = 255
    Image.fromarray(mask).save(out / "pasted-mask.png")

    images, labels = load_fashion_mnist("test")
    sneaker = _product(images, labels, SNEAKER, 0)
    sneaker.save(out / "fmnist-sneaker.png")
    product = np.asarray(sneaker.convert("L")) > 20  # the product, not its black surround
    Image.fromarray(product.astype(np.uint8) * 255).save(out / "fmnist-sneaker-mask.png")
    _product(images, labels, BOOT, 3).save(out / "fmnist-boot.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/lvd-readme"))
