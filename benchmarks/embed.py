"""Embedding throughput of `Embedder.embed_images` against a baseline in the same process.

The baseline is torchvision Resize + CenterCrop + Normalize of full decodes, one image at a
time into the same batched forward (no DCT draft, no decode threads). Printed as a ratio.
Copy detection's quality on real-image copies is `benchmarks/copy_quality.py`.

Run: .venv/bin/python benchmarks/embed.py [--backbone SPEC] [--arch vit_small]
     [--throughput 128] [--device auto]
"""

from __future__ import annotations

import argparse
import io
import time

import torch
from PIL import Image

from lvd.curation.copies import (
    encode_original,
    real_photos,
)
from lvd.curation.embed import EmbedConfig, Embedder


def backbone(args):
    if args.backbone:
        return args.backbone
    from lvd.pretrain.models.vit import ARCHITECTURES

    torch.manual_seed(0)
    print(f"no --backbone: a random {args.arch} (throughput does not depend on the weights)")
    return ARCHITECTURES[args.arch](num_register_tokens=4)


def throughput(emb: Embedder, n: int) -> None:
    import torchvision.transforms as T

    photos = real_photos()
    blobs = [encode_original(photos[i % len(photos)][1]) for i in range(n)]
    cfg = emb.cfg
    tf = T.Compose(
        [
            T.Resize(cfg.resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(cfg.crop),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )
    emb.embed_images(blobs[: cfg.batch_size])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, n, cfg.batch_size):
        x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[s : s + cfg.batch_size]])
        emb.embed_pixels(x)
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb.embed_images(blobs)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = emb.preprocess(blobs[: cfg.batch_size], [str(i) for i in range(cfg.batch_size)])
    pre = (time.perf_counter() - t0) / cfg.batch_size
    print(
        f"throughput on {emb.device} ({n} JPEGs, batch {cfg.batch_size}): baseline {n / base:.1f} img/s, "
        f"Embedder {n / ours:.1f} img/s, ratio {base / ours:.2f}x; decode+preprocess {1e3 * pre:.1f} ms/img"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", help="lvd checkpoint/run folder, official .pth or HF folder (default: random --arch)")
    p.add_argument("--arch", default="vit_small", help="random architecture when no --backbone")
    p.add_argument("--throughput", type=int, default=128, help="images to embed")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch size")
    p.add_argument("--device", default="auto", help="torch device, or auto")
    args = p.parse_args()
    emb = Embedder(backbone(args), EmbedConfig(batch_size=args.batch_size, device=args.device))
    throughput(emb, args.throughput)


if __name__ == "__main__":
    main()
