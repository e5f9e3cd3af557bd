"""Does pretraining learn? The `tiny` recipe on Fashion-MNIST, then k-NN top-1.

Trains the `tiny` recipe (ViT-Tiny, 56/28 px crops) for --steps steps on Fashion-MNIST
training images written as WebDataset shards (labels unused), then compares k-NN accuracy
(k=20, T=0.07, on a train/val subset of labelled folders) of:
  trained teacher  vs  the same architecture at random init  vs  raw pixels.
Prints a markdown table; the trained teacher must clearly beat random init.

Needs /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`).
Run: .venv/bin/python benchmarks/learning.py [--steps 600] [--out /tmp/lvd-learning]
(about 15 minutes on 2 busy CPU cores with the defaults; --steps 100 gives a quick look).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import load_teacher_backbone
from lvd.pretrain.knn import evaluate_knn, knn_top1
from lvd.pretrain.recipes import tiny
from lvd.pretrain.train import TrainConfig, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps (batch 32)")
    p.add_argument("--train-images", type=int, default=20000,
                   help="Fashion-MNIST training images written as pretraining shards")
    p.add_argument("--knn-train", type=int, default=10000, help="labelled k-NN train subset")
    p.add_argument("--knn-val", type=int, default=2000, help="labelled k-NN val subset")
    p.add_argument("--num-workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--out", type=Path, default=Path("/tmp/lvd-learning"), help="work folder")
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[tuple[str, ...], Path, Path]:
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    shard_dir, train_dir, val_dir = (args.out / n for n in ("shards", "knn-train", "knn-val"))
    if not (shard_dir / "manifest.parquet").exists():
        write_shards(x_train[: args.train_images], shard_dir, samples_per_shard=1000, size=56)
    if not train_dir.exists():
        # k-NN "train" images are the last ones of the training split, disjoint from shards
        # only when train_images + knn_train <= 60000 (labels are never used in training)
        write_labelled_folder(x_train[-args.knn_train :], y_train[-args.knn_train :],
                              train_dir, size=56)
        write_labelled_folder(x_test[: args.knn_val], y_test[: args.knn_val], val_dir, size=56)
    return tuple(sorted(str(p) for p in shard_dir.glob("*.tar"))), train_dir, val_dir


def raw_pixel_top1(args: argparse.Namespace) -> float:
    x_lab, y_lab = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    tr = torch.from_numpy(x_lab[-args.knn_train :].reshape(args.knn_train, -1).astype(np.float32))
    va = torch.from_numpy(x_test[: args.knn_val].reshape(args.knn_val, -1).astype(np.float32))
    mean = tr.mean(0, keepdim=True)  # centre, so cosine similarity compares shapes
    return knn_top1(tr - mean, torch.from_numpy(y_lab[-args.knn_train :]), va - mean,
                    torch.from_numpy(y_test[: args.knn_val]))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shards, train_dir, val_dir = prepare(args)
    base = tiny()
    recipe = replace(base, epochs=max(1, args.steps // base.epoch_length),
                     checkpoint_every=max(args.steps // 4, 1), log_every=50)
    run = args.out / f"run-{args.steps}"
    t0 = time.perf_counter()
    result = train(TrainConfig(shards=shards, recipe=recipe, out=run, max_steps=args.steps,
                               resume=True, num_workers=args.num_workers))
    train_s = time.perf_counter() - t0
    losses = [x["loss"] for x in result.losses]

    size = recipe.crops.global_size
    trained = evaluate_knn(load_teacher_backbone(run), train_dir, val_dir, size=size)
    torch.manual_seed(0)
    random_init = evaluate_knn(recipe.backbone.build(img_size=size), train_dir, val_dir,
                               size=size)
    pixels = raw_pixel_top1(args)

    print(f"\n`tiny` recipe, {result.end_step} steps of batch {recipe.batch_size} "
          f"({train_s / 60:.1f} min this call); k-NN k=20 T=0.07, "
          f"{trained.n_train} train / {trained.n_val} val Fashion-MNIST images\n")
    if losses:
        print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}\n")
    print("| features | k-NN top-1 | vs random init |")
    print("|---|---|---|")
    for name, top1 in (("trained teacher (CLS)", trained.top1),
                       ("random init, same ViT (CLS)", random_init.top1),
                       ("raw pixels", pixels)):
        print(f"| {name} | {100 * top1:.2f}% | {top1 / random_init.top1:.2f}x |")


if __name__ == "__main__":
    main()
