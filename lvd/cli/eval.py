"""`lvd eval knn`: k-NN top-1 of a checkpoint's teacher on labelled image folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a pretrained checkpoint")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    knn = sub.add_parser("knn", help="k-NN classification (weighted voting, as DINO) on teacher CLS features")
    knn.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint dir (step_NNNNNNN) or a run's --out folder (latest)",
    )
    knn.add_argument("--train", required=True, type=Path, help="labelled training images: DIR/<class>/*.png")
    knn.add_argument("--val", required=True, type=Path, help="labelled validation images: DIR/<class>/*.png")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cosine / T) (default 0.07)")
    knn.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default: the recipe's global crop size)"
    )
    knn.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    knn.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    knn.set_defaults(func=main_knn)


def main_knn(args: argparse.Namespace) -> int:
    import torch

    from lvd.pretrain.checkpoint import load_teacher_backbone, resolve_checkpoint
    from lvd.pretrain.knn import evaluate_knn

    ckpt = resolve_checkpoint(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher_backbone(ckpt).to(device)
    result = evaluate_knn(
        backbone,
        args.train,
        args.val,
        size=args.size or backbone.config.img_size,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        device=device,
    )
    (ckpt / "eval_knn.json").write_text(result.to_json() + "\n")
    print(
        f"k-NN top-1 {100 * result.top1:.2f}% (k={result.k}, T={result.temperature}, "
        f"{result.n_train} train / {result.n_val} val) for {ckpt}"
    )
    return 0
