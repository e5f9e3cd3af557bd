"""Copy-detection threshold of a learned lvd backbone, calibrated on real-image copies.

Copy pairs: (original, copy) for every real photo of `lvd.curation.copies.real_photos(crops=True)`
and for `--fashion` Fashion-MNIST products (upscaled to 64 px: in-domain for the `tiny` recipe),
one copy per kind of `make_copies` (exact, resized, recompressed, reencoded, brightened, cropped).
Distinct pairs: all pairs of distinct photos, and all pairs of the distinct products (hard
negatives: flat background, same framing). Both through `Embedder.embed_images` at the
checkpoint's native size. Prints, per embedding (the checkpoint and a random-init twin of the
same architecture), the min / median copy cosine per kind and domain, the distinct tail, and
`copydetect.calibrate_threshold` with recall / false-link rates at it and at the paper's 0.6.
By default images are embedded at the backbone's native size (what an lvd `tiny` run was
trained at); `--resize 256 --crop 224` gives the DINOv2 eval transform the curate flow's embed
stage uses by default. Calibrate with the resize/crop the flow will embed with.

Run: .venv/bin/python benchmarks/copy_threshold.py [--embedder SPEC] [--fashion 300]
     [--resize R --crop C]
SPEC: an lvd run folder or checkpoint dir (default /tmp/lvd-learning/run-600, written by
benchmarks/learning.py), an official DINOv2 .pth or a Hugging Face Dinov2 folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvd.curation.copies import (
    COPY_KINDS,
    encode_original,
    fashion_mnist,
    make_copies,
    real_photos,
)
from lvd.curation.copydetect import calibrate_threshold, separation
from lvd.curation.embed import EmbedConfig, Embedder

DEFAULT_EMBEDDER = "/tmp/lvd-learning/run-600"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pair_cosines(emb: Embedder, images: list[Image.Image], original) -> tuple[dict, np.ndarray]:
    """(kind -> cosine of each image with its copy, cosines of all distinct image pairs)."""
    v = emb.embed_images([original(img) for img in images]).astype(np.float32)
    copies = [make_copies(img, seed=i) for i, img in enumerate(images)]
    sims = {}
    for kind in COPY_KINDS:
        c = emb.embed_images([cp[kind] for cp in copies]).astype(np.float32)
        sims[kind] = np.sum(c * v, axis=1)
    return sims, (v @ v.T)[np.triu_indices(len(v), 1)]


def report(name: str, emb: Embedder, n_fashion: int) -> dict:
    photos = [img for _, img in real_photos(crops=True)]
    products = fashion_mnist(n_fashion, size=64, seed=1)
    p_copy, p_dist = pair_cosines(emb, photos, encode_original)
    f_copy, f_dist = pair_cosines(emb, products, png)
    print(f"\n## {name}: {len(photos)} photos, {len(products)} Fashion-MNIST products\n")
    print("| copy kind | photos min | photos median | products min | products median |")
    print("|---|---:|---:|---:|---:|")
    for k in COPY_KINDS:
        print(f"| {k} | {p_copy[k].min():.4f} | {np.median(p_copy[k]):.4f} | {f_copy[k].min():.4f} | {np.median(f_copy[k]):.4f} |")
    for label, d in (("photo pairs", p_dist), ("product pairs", f_dist)):
        q = np.quantile(d, [0.5, 0.99])
        print(f"| distinct {label} ({len(d)}) | median {q[0]:.4f} | p99 {q[1]:.4f} | max {d.max():.4f} | |")
    copy = np.concatenate([*p_copy.values(), *f_copy.values()])
    distinct = np.concatenate([p_dist, f_dist])
    out = {}
    for rate in (0.0, 0.001, 0.01):
        try:
            t = calibrate_threshold(copy, distinct, max_false_rate=rate)
        except ValueError as e:
            print(f"\nmax_false_rate={rate}: {e}")
            continue
        rec, false = separation(copy, distinct, t)
        out[rate] = t
        print(f"\nmax_false_rate={rate}: threshold {t:.4f} -> copies linked {rec:.3f}, distinct linked {false:.5f}")
    for t in (0.6,):
        rec, false = separation(copy, distinct, t)
        print(f"paper {t}: copies linked {rec:.3f}, distinct linked {false:.5f}")
    return out


def main() -> None:
    from lvd.pretrain.models.load import load_backbone
    from lvd.pretrain.models.vit import VisionTransformer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embedder", type=Path, default=Path(DEFAULT_EMBEDDER),
                   help="lvd run folder or checkpoint dir, official DINOv2 .pth, or HF Dinov2 folder")
    p.add_argument("--fashion", type=int, default=300, help="Fashion-MNIST products (copies and hard negatives)")
    p.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: native size)")
    p.add_argument("--crop", type=int, default=None, help="centre crop (default: native size)")
    args = p.parse_args()
    torch.set_num_threads(2)
    backbone = load_backbone(args.embedder)
    native = backbone.config.img_size
    resize, crop = args.resize or native, args.crop or native
    cfg = EmbedConfig(resize=resize, crop=crop, batch_size=128, device="cpu", decode_threads=2)
    where = f"resize {resize} crop {crop}"
    report(f"trained {args.embedder}, {where}", Embedder(backbone, cfg), args.fashion)
    torch.manual_seed(0)  # the same architecture at random init: what training added
    twin = VisionTransformer(**dataclasses.asdict(backbone.config)).eval()
    report(f"random-init twin, {where}", Embedder(twin, cfg), args.fashion)


if __name__ == "__main__":
    main()
