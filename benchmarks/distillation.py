"""Does distillation help at CPU scale? k-NN top-1 of a frozen teacher, of a `tiny` student
distilled from it, and of the same student trained from scratch for the same steps.

Both students use one recipe (`tiny`, its cosine schedules stretched over --steps, seed 0);
the distilled one adds `distill.teacher = TEACHER` (`lvd pretrain --distill-from`), which also
turns the student's drop path off (already 0 in `tiny`). Each student is measured through
its checkpoint's teacher, the EMA of the student, as DINOv2 releases distilled models.
k-NN: k=20, T=0.07 on the labelled Fashion-MNIST split benchmarks/learning.py writes under
its --out (the same rows as its learning curve); this script writes that split itself when
it is missing.

`distillation_rows(...)` is the function benchmarks/learning.py calls for its distil rows.
Run: .venv/bin/python benchmarks/distillation.py --teacher RUN_OR_CHECKPOINT [--steps 300]
     [--data /tmp/lvd-learning] [--out /tmp/lvd-distill]
The teacher must use `tiny`'s heads (1024 prototypes, any lvd run trained with `tiny`'s head
settings), or be a backbone-only file (its heads then start frozen at random: distill.py).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import checkpoint_dir, load_teacher_backbone
from lvd.pretrain.distill import distilled
from lvd.pretrain.knn import evaluate_knn
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.recipes import Recipe, tiny
from lvd.pretrain.train import TrainConfig, train


def student_recipe(steps: int, base: Recipe | None = None) -> Recipe:
    """`base` (default `tiny`) with its schedules spanning `steps` and a checkpoint at the end."""
    r = base or tiny()
    return replace(r, epochs=max(1, steps // r.epoch_length), checkpoint_every=steps, keep_checkpoints=1, log_every=50)


def _knn(backbone, cache: Path, train_dir: Path, val_dir: Path, size: int) -> float:
    if cache.exists():
        return json.loads(cache.read_text())["top1"]
    result = evaluate_knn(backbone, train_dir, val_dir, size=size)
    cache.write_text(result.to_json())
    return result.top1


def _train(shards, recipe: Recipe, out: Path, steps: int, num_workers: int) -> Path:
    t0 = time.perf_counter()
    train(
        TrainConfig(
            shards=tuple(shards),
            recipe=recipe,
            out=out,
            max_steps=steps,
            resume=True,
            num_workers=num_workers,
            pictures=False,
        )
    )
    print(f"{out.name}: {steps} steps, {(time.perf_counter() - t0) / 60:.1f} min this call", flush=True)
    return checkpoint_dir(out, steps)


def distillation_rows(
    teacher: str | Path,
    shards,
    train_dir: Path,
    val_dir: Path,
    out: Path,
    *,
    steps: int,
    student: Recipe | None = None,
    num_workers: int = 1,
) -> list[tuple[str, float]]:
    """[(row name, k-NN top-1)] for the teacher, the distilled student and the student from
    scratch at `steps` steps; runs resume and k-NN results are cached under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = student_recipe(steps, student)
    size = scratch.crops.global_size
    rows = [(f"teacher ({teacher})", _knn(load_backbone(teacher), out / "teacher_knn.json", train_dir, val_dir, size))]
    for name, recipe in (("distilled", distilled(scratch, teacher)), ("scratch", scratch)):
        ckpt = _train(shards, recipe, out / f"{name}-{steps}", steps, num_workers)
        top1 = _knn(load_teacher_backbone(ckpt), ckpt / "distill_knn.json", train_dir, val_dir, size)
        label = (
            f"`{scratch.name}` distilled from the teacher, {steps} steps (student EMA)"
            if name == "distilled"
            else f"`{scratch.name}` from scratch, {steps} steps (EMA teacher)"
        )
        rows.append((label, top1))
    return rows


def prepare(
    data: Path, train_images: int = 20000, knn_train: int = 10000, knn_val: int = 2000
) -> tuple[list[str], Path, Path]:
    """benchmarks/learning.py's split: shards of Fashion-MNIST train images, labelled folders
    of train images (k-NN memory) and test images (queries); written only when missing."""
    shard_dir, train_dir, val_dir = (data / n for n in ("shards", "knn-train", "knn-val"))
    if not (shard_dir / "manifest.parquet").exists():
        x, _ = load_fashion_mnist("train")
        write_shards(x[:train_images], shard_dir, samples_per_shard=1000, size=56)
    if not train_dir.exists():
        x, y = load_fashion_mnist("train")
        write_labelled_folder(x[-knn_train:], y[-knn_train:], train_dir, size=56)
    if not val_dir.exists():
        x, y = load_fashion_mnist("test")
        write_labelled_folder(x[:knn_val], y[:knn_val], val_dir, size=56)
    return sorted(str(p) for p in shard_dir.glob("*.tar")), train_dir, val_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="frozen teacher SPEC (an lvd run or checkpoint)")
    p.add_argument("--steps", type=int, default=300, help="steps of both students (batch 32)")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/lvd-learning"),
        help="benchmarks/learning.py's --out (shards, knn-train, knn-val)",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/lvd-distill"), help="work folder")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shards, train_dir, val_dir = prepare(args.data)
    rows = distillation_rows(
        args.teacher, shards, train_dir, val_dir, args.out, steps=args.steps, num_workers=args.num_workers
    )
    n_train, n_val = (len(list(d.rglob("*.png"))) for d in (train_dir, val_dir))
    print(
        f"\nk-NN k=20 T=0.07 on {n_train} train / {n_val} val Fashion-MNIST images; students "
        f"`tiny`, batch 32, schedules spanning {args.steps} steps, seed 0\n"
    )
    print("| features | k-NN top-1 |")
    print("|---|---|")
    for name, top1 in rows:
        print(f"| {name} | {100 * top1:.2f}% |")


if __name__ == "__main__":
    main()
