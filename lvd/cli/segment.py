"""`lvd segment --model M --reference IMG --mask MASK --target IMG --out PNG`: zero-shot
segmentation by cosine similarity to the masked reference patches."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvd.cli.options import MODEL_HELP, add_image_size_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment an image by patch similarity to a masked reference image",
        description="The mean feature of the reference patches under MASK is compared (cosine) "
        "with every target patch; the map is upsampled to the target and thresholded. Writes "
        "[reference + mask | target | similarity | target + segment] to --out.",
    )
    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument("--reference", required=True, type=Path, metavar="IMG", help="image showing the object")
    p.add_argument(
        "--mask",
        required=True,
        type=Path,
        metavar="MASK",
        help="mask of the object in the reference: an image of the reference's size, nonzero = object",
    )
    p.add_argument("--target", required=True, type=Path, metavar="IMG", help="image to segment")
    p.add_argument("--out", required=True, type=Path, metavar="PNG", help="picture to write")
    p.add_argument(
        "--mask-out",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write the target's segment as a black/white PNG of the target's size",
    )
    add_image_size_option(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine similarity above which a pixel is in the segment (default: Otsu's threshold of the map)",
    )
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from lvd.tools.features import load_model
    from lvd.tools.images import open_checked_file
    from lvd.tools.segment import render_segmentation, segment

    backbone = load_model(args.model, device=args.device)
    reference, target = open_checked_file(args.reference).convert("RGB"), open_checked_file(args.target).convert("RGB")
    mask = open_checked_file(args.mask)
    seg = segment(backbone, reference, mask, target, size=args.size, threshold=args.threshold)
    for path in (args.out, args.mask_out):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    render_segmentation(reference, mask, target, seg).save(args.out)
    if args.mask_out is not None:
        Image.fromarray((seg.mask_HW * 255).astype(np.uint8)).save(args.mask_out)
    print(
        f"wrote {args.out}: {seg.mask_HW.mean():.1%} of the target segmented at cosine > "
        f"{seg.threshold:.3f} (prototype of {seg.reference_patches} reference patches)"
    )
    return 0
