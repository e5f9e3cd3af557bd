"""`lvd embed` throughput (lvd.tools.embed) against a naive loop in the same process.

Input: a folder of N JPEGs made from the real photos of `lvd.curation.copies` (full size, as
a user's folder would hold them). Baseline: one image at a time, full decode, eval crop, one
forward per image (`extract_batch` with batch 1). Measured: `embed()` in process (batched,
DCT-draft decode on threads), with patch maps, and on one Ray actor (model loaded in the actor,
start-up included). Printed as images/s and ratios to the baseline. The backbone is randomly
initialised (speed does not depend on the weights).

Run: .venv/bin/python benchmarks/tools_embed.py [--arch vit_small] [--n 64] [--size 224]
     [--device auto] [--no-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lvd.curation.copies import encode_original, real_photos
from lvd.tools.embed import EmbedConfig, embed
from lvd.tools.features import FeatureConfig, extract_batch, resolve_device
from lvd.tools.images import open_image


def make_folder(root: Path, n: int) -> Path:
    photos = real_photos()
    for i in range(n):
        name, img = photos[i % len(photos)]
        (root / f"{i:05d}_{name}.jpg").write_bytes(encode_original(img.convert("RGB")))
    return root


def make_model(arch: str, device: str) -> torch.nn.Module:
    from lvd.pretrain.models.vit import ARCHITECTURES

    torch.manual_seed(0)
    return ARCHITECTURES[arch](num_register_tokens=4).eval().to(resolve_device(device))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--n", type=int, default=64, help="images in the folder")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray actor run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lvd-bench-tools-"))
    (tmp / "images").mkdir()
    folder = make_folder(tmp / "images", args.n)
    model = make_model(args.arch, args.device)
    fcfg = FeatureConfig(size=args.size, batch_size=args.batch_size, device=args.device)
    files = sorted(folder.iterdir())

    def baseline():
        for f in files:
            extract_batch(model, [open_image(str(f))], FeatureConfig(size=args.size, batch_size=1, device=args.device))

    runs = {"baseline (1 image per forward, full decode)": timed(baseline)}
    cfg = EmbedConfig(features=fcfg, ray=False)
    runs["embed, in process"] = timed(lambda: embed(model, folder, tmp / "a", cfg))
    pcfg = EmbedConfig(
        features=FeatureConfig(size=args.size, batch_size=args.batch_size, device=args.device, patches=True), ray=False
    )
    runs["embed, in process, + patch maps"] = timed(lambda: embed(model, folder, tmp / "b", pcfg))
    if not args.no_ray:
        from lvd.curation.runner import init_ray

        init_ray()
        rcfg = EmbedConfig(features=fcfg, ray=True)
        runs["embed, 1 Ray actor (start-up included)"] = timed(lambda: embed(model.cpu(), folder, tmp / "c", rcfg))
    base = runs["baseline (1 image per forward, full decode)"]
    print(
        f"{args.arch} at {args.size}px, {args.n} JPEGs, device {resolve_device(args.device)}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, sec in runs.items():
        print(f"  {name:45s} {args.n / sec:8.1f} img/s   x{base / sec:5.2f}")


if __name__ == "__main__":
    main()
