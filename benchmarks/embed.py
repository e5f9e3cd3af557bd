"""Embedding: copy-detection threshold calibration on real photos, and embedding throughput.

Calibration (`copydetect.calibrate_threshold`): the real photos of `lvd.curation.copies` (with
quadrant crops of the two largest) and one copy of each kind per photo are embedded; copy
cosines are (original, its copy) per kind, distinct cosines are all pairs of distinct originals
plus all pairs among N Fashion-MNIST products (hard negatives). Prints per-kind copy cosines,
the distinct tail, the calibrated threshold and recall / false-link rates at it and at the
paper's 0.6. Only meaningful for a learned backbone (`--backbone SPEC`: lvd checkpoint or run
folder, official .pth or HF folder); without one a randomly initialised ViT is used, which
shows the method but whose cosines say nothing about copies.

Throughput: images per second of `Embedder.embed_images` against a baseline in the same
process: torchvision Resize + CenterCrop + Normalize of full decodes, one image at a time into
the same batched forward (no DCT draft, no decode threads). Printed as a ratio.

Run: .venv/bin/python benchmarks/embed.py [--backbone SPEC] [--arch vit_small] [--fashion 300]
     [--throughput 128] [--device auto]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos
from lvd.curation.copydetect import calibrate_threshold, separation
from lvd.curation.embed import EmbedConfig, Embedder


def backbone(args):
    if args.backbone:
        return args.backbone
    from lvd.pretrain.models.vit import ARCHITECTURES

    torch.manual_seed(0)
    print(f"no --backbone: RANDOM {args.arch}; its cosines are meaningless for copy detection")
    return ARCHITECTURES[args.arch](num_register_tokens=4)


def calibrate(emb: Embedder, n_fashion: int) -> None:
    photos = real_photos(crops=True)
    originals = [encode_original(img) for _, img in photos]
    copies = [make_copies(img, seed=i) for i, (_, img) in enumerate(photos)]
    v_orig = emb.embed_images(originals).astype(np.float32)
    copy_sims = {}
    for kind in COPY_KINDS:
        v = emb.embed_images([c[kind] for c in copies]).astype(np.float32)
        copy_sims[kind] = np.sum(v * v_orig, axis=1)
    iu = np.triu_indices(len(v_orig), 1)
    distinct = (v_orig @ v_orig.T)[iu]
    if n_fashion:
        fm = [_png(img) for img in fashion_mnist(n_fashion, size=64)]
        v_fm = emb.embed_images(fm).astype(np.float32)
        distinct = np.concatenate([distinct, (v_fm @ v_fm.T)[np.triu_indices(len(v_fm), 1)]])
    print(f"{len(photos)} photos, {len(distinct)} distinct pairs")
    for kind, s in copy_sims.items():
        print(f"  copy {kind:13s} cosine min {s.min():.4f}  median {np.median(s):.4f}")
    q = np.quantile(distinct, [0.5, 0.99, 0.999])
    print(f"  distinct       cosine median {q[0]:.4f}  p99 {q[1]:.4f}  p99.9 {q[2]:.4f}  max {distinct.max():.4f}")
    all_copy = np.concatenate(list(copy_sims.values()))
    for rate in (0.0, 0.001):
        try:
            t = calibrate_threshold(all_copy, distinct, max_false_rate=rate)
        except ValueError as e:
            print(f"  max_false_rate={rate}: {e}")
            continue
        rec, false = separation(all_copy, distinct, t)
        print(f"  max_false_rate={rate}: threshold {t:.4f} -> copies linked {rec:.3f}, distinct linked {false:.5f}")
    rec, false = separation(all_copy, distinct, 0.6)
    print(f"  paper 0.6: copies linked {rec:.3f}, distinct linked {false:.5f}")


def throughput(emb: Embedder, n: int) -> None:
    import torchvision.transforms as T

    photos = real_photos()
    blobs = [encode_original(photos[i % len(photos)][1]) for i in range(n)]
    cfg = emb.cfg
    tf = T.Compose([T.Resize(cfg.resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.crop),
                    T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
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
    print(f"throughput on {emb.device} ({n} JPEGs, batch {cfg.batch_size}): baseline {n / base:.1f} img/s, "
          f"Embedder {n / ours:.1f} img/s, ratio {base / ours:.2f}x; decode+preprocess {1e3 * pre:.1f} ms/img")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", help="lvd checkpoint/run folder, official .pth or HF folder (default: random --arch)")
    p.add_argument("--arch", default="vit_small", help="random architecture when no --backbone")
    p.add_argument("--fashion", type=int, default=300, help="Fashion-MNIST hard negatives (0: none)")
    p.add_argument("--skip-calibration", action="store_true", help="only the throughput run")
    p.add_argument("--throughput", type=int, default=128, help="images for the throughput run (0: skip)")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch size")
    p.add_argument("--device", default="auto", help="torch device, or auto")
    args = p.parse_args()
    emb = Embedder(backbone(args), EmbedConfig(batch_size=args.batch_size, device=args.device))
    if not args.skip_calibration:
        calibrate(emb, args.fashion)
    if args.throughput:
        throughput(emb, args.throughput)


if __name__ == "__main__":
    main()
