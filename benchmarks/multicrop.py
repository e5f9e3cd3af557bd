"""Multi-crop throughput: our v2 pipeline (photometric ops on uint8 tensors) against an
official-style one (torchvision v1 transforms on PIL images, as dinov2/data/augmentations.py).

Same image, same crop counts and sizes, one thread (as in a DataLoader worker), rounds
alternating between the two. Prints images/s of each and the ratio ours / official
(>= 1.0: we are at least as fast). The baseline uses the paper's blur probabilities too,
so both do the same amount of work.

    .venv/bin/python benchmarks/multicrop.py --images 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image
from skimage import data
from torchvision import transforms as v1

from lvd.pretrain.data import MultiCrop, MultiCropConfig


def official_style(cfg: MultiCropConfig):
    def crop(size, scale, blur_p, solarize_p):
        steps = [
            v1.RandomResizedCrop(size, scale=scale, interpolation=v1.InterpolationMode.BICUBIC),
            v1.RandomHorizontalFlip(0.5),
            v1.RandomApply([v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v1.RandomGrayscale(0.2),
            v1.RandomApply([v1.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p:
            steps.append(v1.RandomSolarize(128, p=solarize_p))
        return v1.Compose(steps + [v1.ToTensor(), v1.Normalize(cfg.mean, cfg.std)])

    globals_ = [crop(cfg.global_size, cfg.global_scale, b, s) for b, s in zip(cfg.global_blur_p, cfg.global_solarize_p)]
    local = crop(cfg.local_size, cfg.local_scale, cfg.local_blur_p, 0.0)
    return lambda img: ([t(img) for t in globals_], [local(img) for _ in range(cfg.n_local)])


def rate(fn, img: Image.Image, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(img)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per pipeline (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    img = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    cfg = MultiCropConfig()  # 2 x 224 + 8 x 98
    ours, official = MultiCrop(cfg), official_style(cfg)
    rate(ours, img, 2), rate(official, img, 2)  # warm-up
    r_ours, r_off = [], []
    for _ in range(args.repeats):
        r_ours.append(rate(ours, img, args.images))
        r_off.append(rate(official, img, args.images))
    a, b = statistics.median(r_ours), statistics.median(r_off)
    print(
        f"multi-crop 2x{cfg.global_size} + {cfg.n_local}x{cfg.local_size} of a 512px image, 1 thread: "
        f"ours {a:.1f} img/s, official-style {b:.1f} img/s, ratio ours/official {a / b:.2f}"
    )


if __name__ == "__main__":
    main()
