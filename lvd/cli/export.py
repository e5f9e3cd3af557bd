"""`lvd export CKPT --hf OUT`: the teacher backbone as a Hugging Face Dinov2 folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint's teacher backbone as a Hugging Face model folder")
    p.add_argument(
        "checkpoint", metavar="CKPT", type=Path, help="a checkpoint dir (step_NNNNNNN) or a run's --out folder (latest)"
    )
    p.add_argument(
        "--hf", required=True, type=Path, metavar="OUT_DIR", help="folder to write (config.json + model.safetensors)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.pretrain.checkpoint import load_teacher_backbone, resolve_checkpoint
    from lvd.pretrain.models.hf import export_hf

    ckpt = resolve_checkpoint(args.checkpoint)
    export_hf(load_teacher_backbone(ckpt), args.hf)
    print(f"exported the teacher backbone of {ckpt} to {args.hf}")
    return 0
