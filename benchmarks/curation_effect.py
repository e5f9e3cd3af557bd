"""Curation's effect in miniature (DINOv2 paper, Table 2, at CPU scale).

Builds an uncurated pool: Fashion-MNIST training images, exact and near duplicates of some of
them, off-domain photos (random crops of scikit-image / scikit-learn sample photos) and junk
(noise, flat colours, gradients, stripes). Curates it with `lvd pipeline` (a subprocess:
hash dedup (copy detection with --copy-detection), then sample-based retrieval of the pool images nearest to
labelled Fashion-MNIST training images given as --seeds, with the bootstrap embedder the
pipeline trains on the pool itself), which then pretrains `tiny` on the curated shards for
--steps steps. The same `tiny` recipe is trained for the same steps (same seed, schedule and
batch) on the whole raw pool. Both teachers are scored by k-NN top-1 on one validation split
(Fashion-MNIST test images; k-NN train = labelled train images disjoint from pool and seeds).

Needs /usr/share/datasets/fashion-mnist. Run:
  .venv/bin/python benchmarks/curation_effect.py [--steps 150] [--out /tmp/lvd-curation-effect]
(about 45 minutes on 2 heavily shared CPU cores: ~10 for curation, ~15 for each pretraining run).
Re-running resumes: the pool, the pipeline's run and the raw run are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lvd.datasets import load_fashion_mnist, to_rgb, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import latest_checkpoint, load_teacher_backbone
from lvd.pretrain.knn import evaluate_knn
from lvd.pretrain.recipes import tiny
from lvd.pretrain.train import TrainConfig, train

COLUMNS = ("Fashion-MNIST, distinct", "Fashion-MNIST, repeats", "photo crops", "junk")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="pretraining steps of each arm (batch 32)")
    p.add_argument("--fmnist", type=int, default=1500, help="distinct Fashion-MNIST pool images")
    p.add_argument("--dups", type=int, default=600, help="duplicates (half exact, half near)")
    p.add_argument("--photos", type=int, default=1000, help="off-domain photo crops")
    p.add_argument("--junk", type=int, default=400, help="noise / flat / gradient / stripe images")
    p.add_argument("--seeds", type=int, default=500, help="labelled training images as seeds")
    p.add_argument("--knn-train", type=int, default=5000, help="labelled k-NN train subset")
    p.add_argument("--knn-val", type=int, default=2000, help="labelled k-NN val subset")
    p.add_argument("--bootstrap-steps", type=int, default=30, help="pipeline's bootstrap embedder")
    p.add_argument(
        "--copy-detection",
        action="store_true",
        help="run the pipeline's copy detection too (off: hash dedup only, which "
        "catches this pool's exact and brightness-shifted copies; ~4x the time)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("/tmp/lvd-curation-effect"), help="work folder")
    return p.parse_args()


# ---------------------------------------------------------------- the uncurated pool


def sample_photos() -> list[np.ndarray]:
    """RGB photos that ship inside scikit-image and scikit-learn (nothing is downloaded)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "immunohistochemistry",
        "hubble_deep_field",
        "camera",
        "coins",
        "moon",
        "page",
        "text",
        "clock",
    ):
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a data file this skimage build does not ship
            continue
        photos.append(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2))
    return [p[..., :3].astype(np.uint8) for p in photos]


def photo_crops(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    photos, out = sample_photos(), []
    for _ in range(n):
        p = photos[rng.integers(len(photos))]
        side = int(rng.integers(32, min(p.shape[:2]) // 2))
        y, x = rng.integers(p.shape[0] - side), rng.integers(p.shape[1] - side)
        size = int(rng.integers(56, 97))
        crop = Image.fromarray(p[y : y + side, x : x + side]).resize((size, size))
        out.append(np.asarray(crop))
    return out


def junk(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i in range(n):
        size = int(rng.integers(56, 97))
        kind = i % 4
        if kind == 0:  # uniform noise
            img = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:  # a flat colour with faint noise (not all exact duplicates)
            img = rng.integers(0, 256, 3)[None, None] + rng.normal(0, 2, (size, size, 3))
        elif kind == 2:  # a gradient
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
            img = np.broadcast_to(a + (b - a) * t, (size, size, 3))
        else:  # stripes
            period = int(rng.integers(2, 12))
            img = ((np.arange(size)[:, None] // period) % 2 * 255)[..., None] * np.ones((1, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


PoolItem = tuple[str, int, np.ndarray]  # kind, Fashion-MNIST index (-1: none), image


def build_pool(args: argparse.Namespace, x_train: np.ndarray) -> list[PoolItem]:
    """Pool items, shuffled. Fashion-MNIST pool images come from the start of the training
    split; seeds and k-NN train images from its end (disjoint)."""
    rng = np.random.default_rng(0)
    fm = [np.asarray(to_rgb(x, 56)) for x in x_train[: args.fmnist]]
    items: list[PoolItem] = [("fmnist", j, x) for j, x in enumerate(fm)]
    for i, j in enumerate(rng.integers(0, len(fm), args.dups)):
        x = fm[j]
        if i % 2:  # near duplicate: brightness shift and noise
            x = np.clip(x.astype(np.int16) + int(rng.integers(-12, 13)) + rng.integers(-3, 4, x.shape), 0, 255).astype(
                np.uint8
            )
        items.append(("dup", int(j), x))
    items += [("photo", -1, x) for x in photo_crops(args.photos, rng)]
    items += [("junk", -1, x) for x in junk(args.junk, rng)]
    return [items[i] for i in rng.permutation(len(items))]


def pool_name(i: int, item: PoolItem) -> str:
    return f"{item[0]}-{i:06d}.png"


def composition(items: list[PoolItem]) -> tuple[int, ...]:
    """Counts per COLUMNS: distinct Fashion-MNIST products, further copies of them, photo
    crops, junk. (A kept 'dup' file may be its group's representative: counted by origin.)"""
    fm = [j for kind, j, _ in items if j >= 0]
    kinds = Counter(kind for kind, _, _ in items)
    return len(set(fm)), len(fm) - len(set(fm)), kinds["photo"], kinds["junk"]


def write_pool(pool: list[PoolItem], folder: Path) -> None:
    from PIL import Image

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(pool):
        Image.fromarray(item[2]).save(tmp / pool_name(i, item))
    tmp.rename(folder)


def curated_items(pool: list[PoolItem], manifest: Path) -> list[PoolItem]:
    """The pool items the curated shards hold, found by their file names."""
    by_name = {pool_name(i, item): item for i, item in enumerate(pool)}
    sources = pq.read_table(manifest, columns=["source"]).column("source").to_pylist()
    return [by_name[Path(s).name] for s in sources]


# ---------------------------------------------------------------- the two arms


def curate_and_train(args, pool_dir: Path, seeds_dir: Path, train_dir: Path, val_dir: Path) -> Path:
    """`lvd pipeline` on the pool (curation, then `tiny` for --steps); its run folder."""
    out = args.out / "curated"
    if latest_checkpoint(out / "pretrain") is not None and (out / "hf").exists():
        return out
    cmd = [
        sys.executable,
        "-m",
        "lvd.cli",
        "pipeline",
        "--input",
        str(pool_dir),
        "--seeds",
        str(seeds_dir),
        "--retrieval",
        "sample",
        "--out",
        str(out),
        "--bootstrap-steps",
        str(args.bootstrap_steps),
        "--recipe",
        "tiny",
        "--max-steps",
        str(args.steps),
        "--num-workers",
        "1",
        "--knn-train",
        str(train_dir),
        "--knn-val",
        str(val_dir),
    ]
    if not args.copy_detection:
        cmd.append("--no-copy-detection")
    if out.exists():
        cmd.append("--extend")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def train_raw(args, pool: list[PoolItem]) -> Path:
    shard_dir, run = args.out / "raw-shards", args.out / "raw"
    if not (shard_dir / "manifest.parquet").exists():
        write_shards([x for _, _, x in pool], shard_dir, samples_per_shard=1000, size=56)
    shards = tuple(sorted(str(p) for p in shard_dir.glob("*.tar")))
    # the pipeline's pretraining: recipe `tiny`, seed 0, max_steps, one loader worker
    train(TrainConfig(shards=shards, recipe=tiny(), out=run, max_steps=args.steps, resume=True, num_workers=1))
    return run


def cached_knn(ckpt: Path, train_dir: Path, val_dir: Path, size: int) -> float:
    """k-NN top-1 of a checkpoint's teacher, cached as CKPT/curation_knn.json."""
    cache = ckpt / "curation_knn.json"
    if not cache.exists():
        cache.write_text(evaluate_knn(load_teacher_backbone(ckpt), train_dir, val_dir, size=size).to_json())
    return json.loads(cache.read_text())["top1"]


def random_init_knn(out: Path, train_dir: Path, val_dir: Path, size: int) -> float:
    """k-NN top-1 of both arms' initial weights (train() seeds 0 before building), cached."""
    cache = out / "random_init_knn.json"
    if not cache.exists():
        torch.manual_seed(0)
        backbone = tiny().backbone.build(img_size=size)
        cache.write_text(evaluate_knn(backbone, train_dir, val_dir, size=size).to_json())
    return json.loads(cache.read_text())["top1"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    pool_dir, seeds_dir = args.out / "pool", args.out / "seeds"
    train_dir, val_dir = args.out / "knn-train", args.out / "knn-val"
    pool = build_pool(args, x_train)
    if not pool_dir.exists():
        write_pool(pool, pool_dir)
    if not train_dir.exists():
        lab_x, lab_y = x_train[-args.knn_train :], y_train[-args.knn_train :]
        write_labelled_folder(lab_x[: args.seeds], lab_y[: args.seeds], seeds_dir, size=56)
        write_labelled_folder(lab_x, lab_y, train_dir, size=56)
        write_labelled_folder(x_test[: args.knn_val], y_test[: args.knn_val], val_dir, size=56)

    t0 = time.perf_counter()
    curated = curate_and_train(args, pool_dir, seeds_dir, train_dir, val_dir)
    t_cur = time.perf_counter() - t0
    raw = train_raw(args, pool)
    t_raw = time.perf_counter() - t0 - t_cur

    size = tiny().crops.global_size
    kept = curated_items(pool, curated / "run" / "shards" / "manifest.parquet")
    # the curated arm's k-NN is the one `lvd pipeline` reported (evaluate_knn, same folders,
    # k=20; tests/pretrain/test_training_breaks.py checks a report against a recomputation)
    reported = json.loads((latest_checkpoint(curated / "pretrain") / "eval_knn.json").read_text())
    rows = [
        ("raw pool", composition(pool), cached_knn(latest_checkpoint(raw), train_dir, val_dir, size)),
        ("curated (`lvd pipeline`)", composition(kept), reported["top1"]),
        ("neither: the same ViT at random init", None, random_init_knn(args.out, train_dir, val_dir, size)),
    ]
    n_train, n_val = reported["n_train"], reported["n_val"]
    print(
        f"\npool: {len(pool)} images ({dict(Counter(k for k, _, _ in pool))}); `tiny`, "
        f"{args.steps} steps of batch 32 on each; k-NN k=20 T=0.07, {n_train} "
        f"train / {n_val} val Fashion-MNIST images; pipeline {t_cur / 60:.1f} min, "
        f"raw run {t_raw / 60:.1f} min this call\n"
    )
    print("| pretraining data | images | " + " | ".join(COLUMNS) + " | k-NN top-1 |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|")
    for name, comp, top1 in rows:
        counts = " | ".join(str(c) for c in comp) if comp else " | ".join(["-"] * len(COLUMNS))
        print(f"| {name} | {sum(comp) if comp else '-'} | {counts} | {100 * top1:.2f}% |")


if __name__ == "__main__":
    main()
