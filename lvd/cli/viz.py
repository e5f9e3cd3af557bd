"""`lvd viz --model M --image IMG --out PNG`: CLS attention (per head and mean) and patch PCA."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvd.cli.options import MODEL_HELP, add_image_size_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "viz",
        help="picture what a backbone sees in one image (attention maps, patch PCA)",
        description="Writes one PNG. Top row: the resized input, the last block's CLS attention "
        "(mean over heads), the foreground mask (first PCA component of the patch features above "
        "--threshold) and the PCA of the foreground patches as RGB. Below: each head's attention.",
    )
    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument("--image", required=True, type=Path, metavar="IMG", help="the image to look at")
    p.add_argument("--out", required=True, type=Path, metavar="PNG", help="picture to write")
    add_image_size_option(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="foreground: first PCA component above this many standard deviations (default 0)",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.tools.features import load_model
    from lvd.tools.images import open_checked_file
    from lvd.tools.viz import patch_maps, render_maps

    backbone = load_model(args.model, device=args.device)
    maps = patch_maps(backbone, open_checked_file(args.image), size=args.size, threshold=args.threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_maps(maps).save(args.out)
    heads, h, w = maps.attention_Khw.shape
    print(f"wrote {args.out}: {h}x{w} patches, {heads} heads, {maps.foreground_hw.mean():.0%} of patches foreground")
    return 0
