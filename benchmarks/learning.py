"""Does pretraining learn, and how fast? `tiny` on Fashion-MNIST, k-NN top-1 along the way.

Trains the `tiny` recipe (ViT-Tiny, 56/28 px crops) on Fashion-MNIST training images written
as WebDataset shards (labels unused) for the largest budget of --curve, one run whose cosine
schedule spans that budget, checkpointing at every budget. Then k-NN top-1 (k=20, T=0.07,
the same labelled train/val split for every row) of the teacher at each budget, next to
raw pixels and the same ViT at random init (budget 0 is the run's own initial weights).

With --distill-teacher RUN, also trains a student (`tiny`) for --distill-steps from that
run's frozen teacher (`lvd pretrain --distill-from`) and the same student from scratch for
the same steps, and adds the teacher's and both students' rows (benchmarks/distillation.py's
`distillation_rows`; its runs and k-NN results are cached under --distill-out).

Needs /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`).
Run: .venv/bin/python benchmarks/learning.py [--curve 0,300,600,1200,2400] [--out /tmp/lvd-learning]
(2-5 s a step on 2 shared CPU cores: 1200 steps took 70 min here with other jobs running, so
2400 take hours; --curve 0,100 gives a quick look, --curve 0,600 is the README pictures' run).
Re-running reuses the run folder (resume) and the cached k-NN results under OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import checkpoint_dir, load_teacher_backbone
from lvd.pretrain.knn import evaluate_knn, knn_top1
from lvd.pretrain.recipes import Recipe, tiny
from lvd.pretrain.train import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--curve",
        default="0,300,600,1200,2400",
        help="comma-separated step budgets (batch 32) at which k-NN is measured",
    )
    p.add_argument(
        "--train-images", type=int, default=20000, help="Fashion-MNIST training images written as pretraining shards"
    )
    p.add_argument("--knn-train", type=int, default=10000, help="labelled k-NN train subset")
    p.add_argument("--knn-val", type=int, default=2000, help="labelled k-NN val subset")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core machine)"
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="only evaluate the checkpoints the curve run already has (a budget not reached is reported as such)",
    )
    p.add_argument(
        "--distill-teacher",
        type=Path,
        default=None,
        help="a trained run whose teacher a fresh `tiny` student distils from",
    )
    p.add_argument("--distill-steps", type=int, default=300, help="steps of both distil rows")
    p.add_argument(
        "--distill-out",
        type=Path,
        default=Path("/tmp/lvd-distill"),
        help="work folder of the distil rows (benchmarks/distillation.py's --out)",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/lvd-learning"), help="work folder")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[tuple[str, ...], Path, Path]:
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    shard_dir, train_dir, val_dir = (args.out / n for n in ("shards", "knn-train", "knn-val"))
    if not (shard_dir / "manifest.parquet").exists():
        write_shards(x_train[: args.train_images], shard_dir, samples_per_shard=1000, size=56)
    if not train_dir.exists():
        # k-NN "train" images are the last ones of the training split, disjoint from shards
        # only when train_images + knn_train <= 60000 (labels are never used in training)
        write_labelled_folder(x_train[-args.knn_train :], y_train[-args.knn_train :], train_dir, size=56)
        write_labelled_folder(x_test[: args.knn_val], y_test[: args.knn_val], val_dir, size=56)
    return tuple(sorted(str(p) for p in shard_dir.glob("*.tar"))), train_dir, val_dir


def raw_pixel_top1(args: argparse.Namespace) -> float:
    x_lab, y_lab = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    tr = torch.from_numpy(x_lab[-args.knn_train :].reshape(args.knn_train, -1).astype(np.float32))
    va = torch.from_numpy(x_test[: args.knn_val].reshape(args.knn_val, -1).astype(np.float32))
    mean = tr.mean(0, keepdim=True)  # centre, so cosine similarity compares shapes
    return knn_top1(
        tr - mean, torch.from_numpy(y_lab[-args.knn_train :]), va - mean, torch.from_numpy(y_test[: args.knn_val])
    )


def curve_recipe(steps: int, checkpoints: list[int]) -> Recipe:
    """`tiny` with its schedules stretched over `steps` and a checkpoint at every budget."""
    base = tiny()
    every = int(np.gcd.reduce([s for s in checkpoints if s > 0] + [steps]))
    return replace(
        base,
        epochs=max(1, steps // base.epoch_length),
        checkpoint_every=every,
        keep_checkpoints=steps // every + 1,
        log_every=50,
    )


def cached_knn(ckpt: Path, train_dir: Path, val_dir: Path, size: int) -> float:
    """k-NN top-1 of a checkpoint's teacher, cached as CKPT/learning_knn.json."""
    cache = ckpt / "learning_knn.json"
    if cache.exists():
        return json.loads(cache.read_text())["top1"]
    result = evaluate_knn(load_teacher_backbone(ckpt), train_dir, val_dir, size=size)
    cache.write_text(result.to_json())
    return result.top1


def train_run(shards, recipe: Recipe, out: Path, steps: int, args, **extra) -> float:
    """Train (or resume) to `steps`; the minutes this call spent training."""
    t0 = time.perf_counter()
    train(
        TrainConfig(
            shards=shards, recipe=recipe, out=out, max_steps=steps, resume=True, num_workers=args.num_workers, **extra
        )
    )
    return (time.perf_counter() - t0) / 60


def learning_curve(args, shards, train_dir: Path, val_dir: Path) -> list[tuple[str, float | None]]:
    budgets = sorted({int(s) for s in args.curve.split(",")})
    top = max(budgets)
    recipe = curve_recipe(top, budgets)
    run = args.out / f"curve-{top}"
    rows = []
    if top > 0 and not args.no_train:
        minutes = train_run(shards, recipe, run, top, args)
        print(f"curve run: {top} steps, {minutes:.1f} min this call -> {run}", flush=True)
    size = recipe.crops.global_size
    for steps in budgets:
        if steps == 0:
            torch.manual_seed(0)  # train() builds the initial weights after seeding with 0
            top1 = evaluate_knn(recipe.backbone.build(img_size=size), train_dir, val_dir, size=size).top1
        elif not checkpoint_dir(run, steps).exists():
            rows.append((f"`tiny`, {steps} steps", None))
            continue
        else:
            top1 = cached_knn(checkpoint_dir(run, steps), train_dir, val_dir, size)
        rows.append((f"`tiny`, {steps} steps" + (" (random init)" if steps == 0 else ""), top1))
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shards, train_dir, val_dir = prepare(args)
    rows = learning_curve(args, shards, train_dir, val_dir)
    rows.append(("raw pixels (centred, 784-d)", raw_pixel_top1(args)))
    if args.distill_teacher is not None:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from distillation import distillation_rows

        rows += distillation_rows(
            args.distill_teacher,
            shards,
            train_dir,
            val_dir,
            args.distill_out,
            steps=args.distill_steps,
            num_workers=args.num_workers,
        )
    n_train = len(list(train_dir.rglob("*.png")))
    n_val = len(list(val_dir.rglob("*.png")))
    print(
        f"\n`tiny` recipe, batch 32, one run whose schedule spans the largest budget; k-NN k=20 "
        f"T=0.07 on {n_train} train / {n_val} val Fashion-MNIST images (the same split for "
        "every row)\n"
    )
    print("| features | k-NN top-1 |")
    print("|---|---|")
    for name, top1 in rows:
        print(f"| {name} | {'not reached' if top1 is None else f'{100 * top1:.2f}%'} |")


if __name__ == "__main__":
    main()
