"""Curation cost per stage on real images, and what it means at 100M and 1B images.

Pool: `--n` Fashion-MNIST train products upscaled to `--side` px and saved as JPEG q90 files,
plus `--copies` of them recompressed at q50 (so dedup has work). Every stage runs in this
process with the library functions the Ray stages call: `ingest.ingest_partition` over
`stages.plan` partitions, `dedup.find_near_duplicates` on the unique accepted records,
`embed.Embedder.embed_images` with the trained `tiny` checkpoint at its native size,
the embedding k-NN graph (`knn_index.build_index` + `similar_pairs`: k=64 neighbours
above cosine 0.94, what copy detection's embedder proposer searches), spherical `kmeans.kmeans` (k = sqrt(N)), and
`shards.write_shards` of the unique images. Per stage: wall seconds, process CPU seconds (all
threads), CPU ms per image, and the process's max RSS after the stage (monotone high-water, so
a stage's own peak is at most the increase it shows). `--big N` also embeds N images with a
random ViT-L/14 at 224 px, the size curation uses, for the CPU cost of a real backbone;
`--photos N` ingests and preprocesses (decode, 256 resize, 224 crop) N real photos.
The extrapolation (printed after the table) scales the linear stages by N and uses the
published growth of dedup candidates (N^1.16, benchmarks/dedup_scale.py).

The partitioned global stages (memory per worker, 10^5..10^7 synthetic images, 1 and 2
workers) are measured by benchmarks/curate_scale.py.

Run: .venv/bin/python benchmarks/curate_cost.py [--n 3000] [--copies 150] [--side 128]
     [--embedder /tmp/lvd-learning/run-600] [--big 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from lvd.curation.copies import encode_original, real_photos
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.embed import EmbedConfig, Embedder
from lvd.curation.ingest import IngestConfig, ingest_item, ingest_partition
from lvd.curation.kmeans import KMeansConfig, kmeans
from lvd.curation.knn_index import build_index, similar_pairs
from lvd.curation.shards import ShardConfig, ShardSample, write_shards
from lvd.curation.sources.raw import RawItem
from lvd.curation.stages.ingest_dedup import plan
from lvd.datasets import load_fashion_mnist

DEFAULT_EMBEDDER = "/tmp/lvd-learning/run-600"
NOT_FOR_DEDUP = ("status", "source", "reason")


class Meter:
    """Wall time, process CPU time and max RSS of each stage, as table rows."""

    def __init__(self):
        self.rows: list[tuple[str, int, float, float, float]] = []

    def run(self, name: str, n_items: int, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        self.rows.append((name, n_items, wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        return out

    def print(self) -> None:
        print("| stage | items | wall s | CPU s | CPU ms / item | CPU core-h / 1M items | max RSS after (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, n, wall, cpu, rss in self.rows:
            print(
                f"| {name} | {n} | {wall:.2f} | {cpu:.2f} | {1e3 * cpu / n:.3f} | {cpu / n * 1e6 / 3600:.2f} | {rss:.0f} |"
            )


def write_pool(folder: Path, n: int, copies: int, side: int) -> None:
    x, _ = load_fashion_mnist("train")
    for i in range(n):
        img = Image.fromarray(x[i]).resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
        img.save(folder / f"{i:07d}.jpg", quality=90)
        if i < copies:
            img.save(folder / f"{i:07d}_copy.jpg", quality=50)


def ingest(folder: Path) -> tuple[pa.Table, pa.Table]:
    outs = [ingest_partition(p, IngestConfig()) for p in plan([str(folder)], 500)]
    records = pa.concat_tables([o.records for o in outs])
    return records, pa.concat_tables([o.blobs for o in outs])


def unique_accepted(records: pa.Table) -> pa.Table:
    t = records.filter(pc.equal(records["status"], "accepted"))
    _, first = np.unique(np.array(t["uid"].to_pylist(), dtype=object), return_index=True)
    return t.take(pa.array(np.sort(first))).drop_columns([c for c in NOT_FOR_DEDUP if c in t.column_names])


def real_photo_costs(m: Meter, n: int) -> None:
    """Ingest and the 224 px embed preprocessing on real photos (JPEG q95 of `real_photos()`,
    0.35 MP and 111 KB on average: closer to web images than upscaled products)."""
    photos = real_photos()
    blobs = [encode_original(photos[i % len(photos)][1]) for i in range(n)]
    items = [RawItem(source=f"p{i}", data=b, error=None) for i, b in enumerate(blobs)]
    cfg = IngestConfig()
    m.run("ingest, real photos", n, lambda: [ingest_item(it, cfg) for it in items])
    from lvd.pretrain.models.vit import vit_tiny

    pre = Embedder(vit_tiny(num_register_tokens=4), EmbedConfig(batch_size=32, device="cpu", decode_threads=1))
    m.run("embed decode+resize 256+crop 224, real photos", n, lambda: pre.preprocess(blobs, [str(i) for i in range(n)]))


def knn_edges(vecs_ND: np.ndarray, *, k: int, threshold: float):
    """Pairs (a < b) among each other's k nearest neighbours with cosine > threshold (exact
    search below 200,000 vectors, IVF above): the embedding copy-edge graph."""
    return similar_pairs(vecs_ND, build_index(vecs_ND), k=k, threshold=threshold)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3000, help="distinct Fashion-MNIST products in the pool")
    p.add_argument("--copies", type=int, default=150, help="recompressed copies added (near-duplicates)")
    p.add_argument("--side", type=int, default=128, help="side of the JPEGs written (px)")
    p.add_argument("--embedder", type=Path, default=Path(DEFAULT_EMBEDDER), help="lvd run folder")
    p.add_argument("--big", type=int, default=16, help="images embedded with a random ViT-L/14 at 224 px (0: skip)")
    p.add_argument(
        "--photos", type=int, default=190, help="real photos for the ingest / preprocess reference (0: skip)"
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    m = Meter()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "pool", Path(tmp) / "shards"
        folder.mkdir()
        write_pool(folder, args.n, args.copies, args.side)
        n_in = args.n + args.copies
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        records, blobs = m.run("ingest (decode, hashes)", n_in, lambda: ingest(folder))
        uniq = unique_accepted(records)
        dups = m.run("dedup (pHash near-dups)", len(uniq), lambda: find_near_duplicates(uniq, DedupConfig()))
        size = int(json.loads((args.embedder / "config.json").read_text())["crops"]["global_size"])
        from lvd.pretrain.checkpoint import load_teacher_backbone

        emb = Embedder(
            load_teacher_backbone(args.embedder),
            EmbedConfig(resize=size, crop=size, batch_size=128, device="cpu", decode_threads=2),
        )
        data = dict(zip(blobs["uid"].to_pylist(), blobs["data"].to_pylist()))
        uids = uniq["uid"].to_pylist()
        vecs = m.run(f"embed (ViT-Ti/14 at {size} px)", len(uids), lambda: emb.embed_images([data[u] for u in uids]))
        if args.big:
            from lvd.pretrain.models.vit import vit_large

            big = Embedder(
                vit_large(num_register_tokens=4, img_size=224),
                EmbedConfig(batch_size=args.big, device="cpu", decode_threads=2),
            )
            m.run(
                "embed (ViT-L/14 at 224 px, random)",
                args.big,
                lambda: big.embed_images([data[u] for u in uids[: args.big]]),
            )
        edges = m.run(
            "embedding k-NN graph (k=64, exact flat)", len(uids), lambda: knn_edges(vecs, k=64, threshold=0.94)
        )
        k = max(2, round(len(uids) ** 0.5))
        m.run(f"k-means (k={k}, spherical)", len(uids), lambda: kmeans(vecs.astype(np.float32), KMeansConfig(k=k)))
        rows = {r["uid"]: r for r in uniq.select(["uid", "width", "height"]).to_pylist()}
        src = dict(zip(records["uid"].to_pylist(), records["source"].to_pylist()))
        samples = [
            ShardSample(uid=u, source=src[u], width=rows[u]["width"], height=rows[u]["height"], data=data[u])
            for u in uids
        ]
        m.run("shard write (WebDataset tars)", len(samples), lambda: write_shards(samples, out, ShardConfig()))
        shard_bytes = sum(f.stat().st_size for f in out.glob("*.tar"))
    if args.photos:
        real_photo_costs(m, args.photos)
    print(
        f"\npool: {n_in} JPEGs ({args.side} px, q90; {args.copies} q50 copies), {len(uids)} unique, "
        f"{len(dups)} pHash duplicates, {len(edges.a)} embedding edges at 0.94; "
        f"RSS before stages {base_rss:.0f} MiB; torch threads 2\n"
    )
    m.print()
    rec_bytes = uniq.nbytes / len(uniq)
    print(
        f"\nper-image bytes: dedup record (uid, sizes, phash, dhash, phash256, thumb16) {rec_bytes:.0f}; "
        f"vector {vecs.shape[1]}-D float16 {2 * vecs.shape[1]}; shard {shard_bytes / len(samples):.0f}"
    )


if __name__ == "__main__":
    main()
