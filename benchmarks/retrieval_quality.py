"""Retrieval quality: do seed-based retrievals return images of the seeds' classes?

Pool: `--pool` Fashion-MNIST test images (all 10 classes, upscaled to the embedder's native
size and PNG-encoded, i.e. real encoded images through `Embedder.embed_images`). Seed sets:
`--seeds` train-split images drawn evenly from 2-3 classes (train and test never share an image).
For every embedding (the trained lvd checkpoint `--embedder`, a random-init ViT of the same
architecture and size, and raw 28x28 pixels L2-normalised) the real library functions run:
`retrieve.sample_based` over `knn_index.build_index` (k=4 and k=32 per seed) and
`retrieve.cluster_based` over spherical `kmeans.kmeans` of the pool (`--clusters` clusters,
paper rule: clusters holding >= 4 seeds, `per_cluster` = all their images; a seed set whose
seeds spread over many clusters gets none: "retrieved 0").
Reported: the share of retrieved pool images whose class is one of the seed set's classes,
against random sampling of the same size (expected share = the pool's prior of those classes).

Run: .venv/bin/python benchmarks/retrieval_quality.py [--embedder /tmp/lvd-learning/run-600]
     [--pool 5000] [--seeds 20] [--clusters 50]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvd.curation.embed import EmbedConfig, Embedder
from lvd.curation.kmeans import KMeansConfig, kmeans
from lvd.curation.knn_index import build_index
from lvd.curation.retrieve import (
    ClusterRetrievalConfig,
    SampleRetrievalConfig,
    cluster_based,
    sample_based,
)
from lvd.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

DEFAULT_EMBEDDER = "/tmp/lvd-learning/run-600"
# (name, classes): easy (distinct shapes), footwear (one super-class), hard (look-alike tops)
SEED_SETS = (("trouser+bag", (1, 8)), ("footwear", (5, 7, 9)), ("tshirt+shirt", (0, 6)))


def native_size(run: Path) -> int:
    """The checkpoint's global crop size (its position embeddings' native input)."""
    return int(json.loads((run / "config.json").read_text())["crops"]["global_size"])


def random_twin(run: Path, size: int) -> torch.nn.Module:
    """A randomly initialised backbone of the checkpoint's architecture."""
    from lvd.pretrain.recipes import Recipe

    torch.manual_seed(0)
    return Recipe.from_dict(json.loads((run / "config.json").read_text())).backbone.build(img_size=size)


def png(pixels_28: np.ndarray, size: int) -> bytes:
    img = Image.fromarray(pixels_28).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def embedder(model: torch.nn.Module, size: int) -> Embedder:
    return Embedder(model, EmbedConfig(resize=size, crop=size, batch_size=128, device="cpu", decode_threads=2))


def embed(emb: Embedder, pixels: np.ndarray, size: int) -> np.ndarray:
    return emb.embed_images([png(p, size) for p in pixels]).astype(np.float32)


def raw_pixels(pixels: np.ndarray) -> np.ndarray:
    x = pixels.reshape(len(pixels), -1).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)


def pick_seeds(y_train: np.ndarray, classes: tuple[int, ...], n: int, rng) -> np.ndarray:
    per = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    return np.concatenate(
        [rng.choice(np.flatnonzero(y_train == c), size=m, replace=False) for c, m in zip(classes, per)]
    )


def evaluate(name: str, pool_ND, seeds_by_set, y_pool, n_clusters: int) -> list[tuple]:
    index = build_index(pool_ND)
    km = kmeans(pool_ND, KMeansConfig(k=n_clusters, spherical=True, seed=0))
    rows = []
    for set_name, classes, seeds_SD in seeds_by_set:
        prior = float(np.isin(y_pool, classes).mean())
        for label, r in (
            ("sample k=4", sample_based(index, seeds_SD, SampleRetrievalConfig(k=4))),
            ("sample k=32", sample_based(index, seeds_SD, SampleRetrievalConfig(k=32))),
            ("cluster", cluster_based(km, seeds_SD, ClusterRetrievalConfig(min_seeds=4, per_cluster=len(y_pool)))),
        ):
            hit = float(np.isin(y_pool[r.pool_idx], classes).mean()) if len(r.pool_idx) else float("nan")
            rows.append((name, set_name, label, r.counts.n_clusters, len(r.pool_idx), hit, prior))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embedder", type=Path, default=Path(DEFAULT_EMBEDDER), help="lvd run folder or checkpoint dir")
    p.add_argument("--pool", type=int, default=5000, help="Fashion-MNIST test images in the pool")
    p.add_argument("--seeds", type=int, default=20, help="seed images per seed set")
    p.add_argument("--clusters", type=int, default=50, help="k-means clusters of the pool (cluster-based)")
    args = p.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x_test, y_test = load_fashion_mnist("test")
    x_train, y_train = load_fashion_mnist("train")
    pool_rows = rng.choice(len(x_test), size=args.pool, replace=False)
    x_pool, y_pool = x_test[pool_rows], y_test[pool_rows]
    seed_rows = [(n, c, pick_seeds(y_train, c, args.seeds, rng)) for n, c in SEED_SETS]
    size = native_size(args.embedder)
    # load_teacher_backbone, not load_backbone: a run folder holds a config.json (the recipe),
    # which load_backbone takes for a Hugging Face folder.
    from lvd.pretrain.checkpoint import load_teacher_backbone

    trained = embedder(load_teacher_backbone(args.embedder), size)
    random_init = embedder(random_twin(args.embedder, size), size)
    embeddings = {
        "trained ViT-Ti": lambda x: embed(trained, x, size),
        "random-init ViT-Ti": lambda x: embed(random_init, x, size),
        "raw pixels": raw_pixels,
    }
    table = []
    for name, fn in embeddings.items():
        t0 = time.perf_counter()
        pool_ND = fn(x_pool)
        seeds = [(n, c, fn(x_train[r])) for n, c, r in seed_rows]
        table += evaluate(name, pool_ND, seeds, y_pool, args.clusters)
        print(f"# {name}: {time.perf_counter() - t0:.1f} s (embed + index + k-means)")
    print(
        f"\npool {args.pool} Fashion-MNIST test images at {size} px, {args.seeds} train seeds per set, "
        f"{args.clusters} k-means clusters; embedder {args.embedder}\n"
    )
    print(
        "| embedding | seed set (classes) | method | clusters used | retrieved | in seed classes | random (prior) | lift |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    names = {n: "+".join(FASHION_MNIST_CLASSES[i] for i in c) for n, c in SEED_SETS}
    for emb_name, set_name, method, n_cl, n, hit, prior in table:
        share, lift = (f"{hit:.1%}", f"{hit / prior:.2f}x") if n else ("-", "-")
        clusters = str(n_cl) if method == "cluster" else ""
        print(f"| {emb_name} | {names[set_name]} | {method} | {clusters} | {n} | {share} | {prior:.1%} | {lift} |")


if __name__ == "__main__":
    main()
