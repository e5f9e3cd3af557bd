"""`lvd probe dense --model M --train DIR --val DIR`: a linear / MLP head on frozen patch
features for depth or disparity maps, with RMSE (and delta1 for depth) against the mean."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvd.cli.options import MODEL_HELP

LAYOUT = "DIR/images/NAME.png|jpg with DIR/targets/NAME.npy (float) or NAME.png (16-bit)"


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="train and evaluate probes on frozen backbone features")
    sub = p.add_subparsers(dest="probe_command", metavar="PROBE", required=True)
    dense = sub.add_parser(
        "dense",
        help="per-pixel depth or disparity from patch features",
        description=f"Folders hold {LAYOUT}. Target pixels that are not finite or not > 0 are "
        "ignored. Prints RMSE (and delta<1.25 for depth) of the probe and of predicting the "
        "training mean, over every valid pixel of --val.",
    )
    dense.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    dense.add_argument("--train", required=True, type=Path, metavar="DIR", help=f"training data: {LAYOUT}")
    dense.add_argument("--val", required=True, type=Path, metavar="DIR", help="held-out data, same layout")
    dense.add_argument(
        "--target",
        choices=("depth", "disparity"),
        default="depth",
        help="what the maps hold (delta1 is reported for depth only; default depth)",
    )
    dense.add_argument("--head", choices=("linear", "mlp"), default="linear", help="probe head (default linear)")
    dense.add_argument(
        "--size",
        type=int,
        default=224,
        help="shorter image side fed to the backbone, a multiple of its patch size (default 224)",
    )
    dense.add_argument("--steps", type=int, default=300, help="full-batch AdamW steps (default 300)")
    dense.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 0.01)")
    dense.add_argument(
        "--png-scale",
        type=float,
        default=1.0,
        help="16-bit target PNGs hold value * SCALE (e.g. 256 for KITTI depth; default 1)",
    )
    dense.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the metrics as JSON")
    dense.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    dense.set_defaults(func=main_dense)


def main_dense(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lvd.tools.features import load_model
    from lvd.tools.probe import (
        DenseProbeConfig,
        evaluate_dense_probe,
        read_dense_folder,
        train_dense_probe,
    )

    cfg = DenseProbeConfig(
        target=args.target, head=args.head, size=args.size, steps=args.steps, lr=args.lr, png_scale=args.png_scale
    )
    backbone = load_model(args.model, device=args.device)
    train = read_dense_folder(args.train, cfg.png_scale)
    val = read_dense_folder(args.val, cfg.png_scale)
    probe = train_dense_probe(backbone, train, cfg)
    metrics = evaluate_dense_probe(backbone, probe, val, cfg)
    print(f"{cfg.head} probe on {len(train)} train / {len(val)} val images, {metrics.pixels} val pixels")
    print(f"  RMSE   probe {metrics.rmse:.4g}   mean predictor {metrics.mean_rmse:.4g}")
    if metrics.delta1 is not None:
        print(f"  d<1.25 probe {metrics.delta1:.3f}   mean predictor {metrics.mean_delta1:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": asdict(cfg), **metrics.to_dict()}, indent=2) + "\n")
    return 0
