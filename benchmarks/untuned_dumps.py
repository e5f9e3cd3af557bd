"""Two untuned dumps for the main job, and what its ledger did with them.

Each dump is real images that ship with packages (Fashion-MNIST rows no test or benchmark uses,
LFW faces, scikit-image / scikit-learn photos), 40 originals copied by a hand-written PIL
generator (not `lvd.curation.copies`), 8 of those originals as an eval set, 10 other products
as seeds, and 3 broken files:
- dump 1: Fashion-MNIST train 5000-5239 at 112 px, LFW 160-199 at 120 px, 7 grey skimage
  photos and the 2 scikit-learn photos; copies: half size, JPEG q20, brightness x1.1-1.4,
  contrast x0.6-0.8, 70-90% crops, mirror;
- dump 2: Fashion-MNIST train 7000-7199 at 112 px, LFW 0-39 at 180 px, two crops of each of 4
  skimage colour photos and the 2 scikit-learn photos; copies: the same kinds with JPEG q15-30,
  brightness x1.2-1.5, 65-85% crops, and a gamma curve (0.6-0.8 or 1.3-1.6);
- dump 3: Fashion-MNIST train 9000-9239 at 140 px, LFW 60-99 at 150 px, 200 px windows of
  skimage's cat and the 2 scikit-learn photos (none overlapping); copies of other kinds: WebP
  q40, 55% size (bilinear), darker x0.6-0.75, 70-85% crops, mirror, a caption band, a black
  letterbox border.

`write N DIR` writes DIR/pool, DIR/seeds, DIR/eval and DIR/truth.json. Then run the main job on
it (`lvd pipeline --input DIR/pool --seeds DIR/seeds --eval-sets DIR/eval --out OUT
--max-steps 20 --bootstrap-steps 20`), and `read DIR OUT` reads OUT's ledger against the
truth: statuses, rejected files with reasons, copies that joined their original's group per
kind, distinct originals merged, eval-family files removed, other images decontaminated.

Run: .venv/bin/python benchmarks/untuned_dumps.py write 2 /tmp/u2 && ... && .venv/bin/python
benchmarks/untuned_dumps.py read /tmp/u2 /tmp/u2-out

`copy-paths DIR WORK` runs copy detection on DIR/pool twice, the single task and the partitioned
path (`scale.copyscale`, forced, in small ranges), and checks that they write the same table.

`select-paths DIR WORK` runs the curate flow (Prefect, local Ray) on DIR/pool with DIR/eval, a
small random ViT as the embedder and balanced sampling to a quarter of the pool, twice: the
cluster and retrieve stages in one task (the Lloyd), then partitioned (`scale.pcluster`,
`scale.pretrieve`, forced, in small buckets); it checks that the clusters, the selection, the
ledger and the shards' uids are the same, and that `lvd verify` passes on both. With `--seeds`
the retrieval is by DIR/seeds instead (sample-based, k=32, capped at an eighth of the pool per seed
set: `scale.pseeds` when partitioned).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BROKEN = {"broken.jpg": b"\xff\xd8\xff\xe0junk", "empty.png": b"", "notimg.jpg": b"hello"}


def _jpg(im: Image.Image, q: int) -> bytes:
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=q)
    return b.getvalue()


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _originals(which: int) -> list[tuple[str, Image.Image]]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    from lvd.curation import copies

    def face(f, side):
        return Image.fromarray((f * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC).convert("RGB")

    if which == 3:
        prods = copies.fashion_mnist(9240, size=140, seed=3, split="train")[9000:9240]
        faces = [face(f, 150) for f in skimage.data.lfw_subset()[60:100]]
        big = [skimage.data.cat()] + list(load_sample_images().images)
        tiles = [
            Image.fromarray(a[y : y + 200, x : x + 200])
            for a in big
            for y in range(0, a.shape[0] - 199, 200)
            for x in range(0, a.shape[1] - 199, 200)
        ]
        return (
            [(f"p{i:03d}", im) for i, im in enumerate(prods)]
            + [(f"f{i:02d}", im) for i, im in enumerate(faces)]
            + [(f"t{i:02d}", im) for i, im in enumerate(tiles)]
        )
    if which == 1:
        prods = copies.fashion_mnist(5300, size=112, seed=3, split="train")[5000:5240]
        faces = [face(f, 120) for f in skimage.data.lfw_subset()[160:200]]
        names = ("camera", "moon", "page", "text", "brick", "grass", "gravel")
        grey = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in names]
    else:
        prods = copies.fashion_mnist(7200, size=112, seed=3, split="train")[7000:7200]
        faces = [face(f, 180) for f in skimage.data.lfw_subset()[0:40]]
        boxes = ((40, 40, 360, 300), (100, 60, 420, 380))
        names = ("astronaut", "chelsea", "coffee", "rocket")
        grey = [
            Image.fromarray(getattr(skimage.data, n)()[..., :3]).convert("RGB").crop(b) for n in names for b in boxes
        ]
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    return (
        [(f"p{i:03d}", im) for i, im in enumerate(prods)]
        + [(f"f{i:02d}", im) for i, im in enumerate(faces)]
        + [(f"g{i}", im) for i, im in enumerate(grey)]
        + [(f"s{i}", im) for i, im in enumerate(photos)]
    )


def _copies(which: int, im: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    w, h = im.size
    if which == 3:
        return _copies3(im, rng)
    c = rng.uniform(0.7, 0.9) if which == 1 else rng.uniform(0.65, 0.85)
    cw, ch = int(w * c), int(h * c)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = {
        "half": _jpg(im.resize((max(32, w // 2), max(32, h // 2))), 80),
        "q20": _jpg(im, 20 if which == 1 else int(rng.integers(15, 31))),
        "bright": _jpg(
            ImageEnhance.Brightness(im).enhance(rng.uniform(1.1, 1.4) if which == 1 else rng.uniform(1.2, 1.5)), 90
        ),
        "contrast": _jpg(ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 0.8)), 90),
        "crop": _jpg(im.crop((x, y, x + cw, y + ch)), 88),
        "mirror": _jpg(ImageOps.mirror(im), 88),
    }
    if which == 2:
        g = float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.3, 1.6)]))
        out["gamma"] = _jpg(im.point([round(255 * (v / 255) ** g) for v in range(256)] * 3), 90)
    return out


def _copies3(im: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    from PIL import ImageDraw

    w, h = im.size
    webp = io.BytesIO()
    im.convert("RGB").save(webp, "WEBP", quality=40)
    c = rng.uniform(0.7, 0.85)
    cw, ch = int(w * c), int(h * c)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    cap = im.convert("RGB")
    band = round(h * 0.15)
    ImageDraw.Draw(cap).rectangle((0, h - band, w, h), fill=(20, 20, 20))
    ImageDraw.Draw(cap).text((4, h - band + 2), "photo 2026", fill=(230, 230, 230))
    pad = round(0.12 * max(w, h))
    box = Image.new("RGB", (w + 2 * pad, h + 2 * pad), (0, 0, 0))
    box.paste(im.convert("RGB"), (pad, pad))
    return {
        "webp": webp.getvalue(),
        "small": _jpg(im.resize((max(32, round(w * 0.55)), max(32, round(h * 0.55))), Image.BILINEAR), 85),
        "dark": _jpg(ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 0.75)), 90),
        "crop": _jpg(im.crop((x, y, x + cw, y + ch)), 88),
        "mirror": _jpg(ImageOps.mirror(im), 88),
        "caption": _jpg(cap, 88),
        "border": _jpg(box, 88),
    }


def write(which: int, root: Path) -> None:
    from lvd.curation import copies

    pool, seeds, ev = root / "pool", root / "seeds", root / "eval"
    for d in (pool, seeds, ev):
        d.mkdir(parents=True, exist_ok=True)
    imgs = _originals(which)
    rng = np.random.default_rng({1: 2026, 2: 77, 3: 3003}[which])
    truth: dict[str, list[str]] = {}
    copied = rng.choice(len(imgs), 40, replace=False).tolist()
    for i, (n, im) in enumerate(imgs):
        (pool / f"{n}.png").write_bytes(_png(im))
        truth[f"{n}.png"] = [n, "original"]
        if i in copied:
            for k, data in _copies(which, im, rng).items():
                (pool / f"{n}__{k}.jpg").write_bytes(data)
                truth[f"{n}__{k}.jpg"] = [n, k]
    evals = [imgs[i][0] for i in copied[:8]]
    for n in evals:
        (ev / f"{n}.png").write_bytes((pool / f"{n}.png").read_bytes())
    lo = {1: 5300, 2: 7300, 3: 9500}[which]
    for i, im in enumerate(copies.fashion_mnist(lo + 100, size=112, seed=3, split="train")[lo : lo + 10]):
        im.save(seeds / f"seed{i}.png")
    for n, data in BROKEN.items():
        (pool / n).write_bytes(data)
        truth[n] = ["broken", "broken"]
    (root / "truth.json").write_text(json.dumps({"truth": truth, "evals": evals}))
    print(f"dump {which}: {len(truth)} files, {len(imgs)} originals, 40 copied; eval originals {evals}")


def read(root: Path, out: Path) -> None:
    from lvd.curation import ledger as lg

    t = json.loads((root / "truth.json").read_text())
    truth, evals = t["truth"], set(t["evals"])
    rows = lg.read_ledger(str(out / "run")).to_pylist()
    by_uid = {r["uid"]: r for r in rows if r["uid"]}

    def name(r):
        return Path(r["source"]).name

    def family(r):
        return truth[name(r)][0]

    def top(r):  # the group's representative
        for _ in range(20):
            if r["status"] != "duplicate" or r.get("duplicate_of") not in by_uid:
                break
            r = by_uid[r["duplicate_of"]]
        return r["uid"]

    print("statuses", dict(collections.Counter(r["status"] for r in rows)))
    print("rejected", [(name(r), r["reason"]) for r in rows if r["status"] == "rejected"])
    original = {family(r): r for r in rows if truth[name(r)][1] == "original"}
    joined: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        f, k = truth[name(r)]
        if k in ("original", "broken"):
            continue
        joined[k][1] += 1
        joined[k][0] += top(r) == top(original[f]) or (r["status"] == "decontaminated" and f in evals)
    print("copies that joined their original's group, per kind", {k: f"{a}/{b}" for k, (a, b) in joined.items()})
    merged = [
        (name(r), name(by_uid[r["duplicate_of"]]), r["reason"])
        for r in rows
        if r["status"] == "duplicate"
        and truth[name(r)][1] == "original"
        and family(by_uid[r["duplicate_of"]]) != family(r)
    ]
    print("distinct originals merged", len(merged), merged[:10])
    fam = [r for r in rows if family(r) in evals]
    shipped = [name(r) for r in fam if r["status"] in ("sharded", "unselected")]
    print(f"eval-family files {len(fam)}, removed {len(fam) - len(shipped)}, still in the pool {shipped}")
    others = [r for r in rows if family(r) not in evals | {"broken"}]
    print("other images decontaminated", sum(r["status"] == "decontaminated" for r in others), "of", len(others))


def copy_paths(root: Path, work: Path, partition: int) -> None:
    """Copy detection on DIR/pool, the single task against the partitioned path (forced, in small
    ranges, uid buckets and order ranges, so every wave has several tasks): the same table,
    stats and calibration, or an AssertionError naming the first difference."""
    import shutil

    import pyarrow.parquet as pq

    from lvd.curation import rundir
    from lvd.curation.copydetect import CopyDetectConfig
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.runner import init_ray
    from lvd.curation.scale.copyscale import CopyScaleConfig
    from lvd.curation.stages import copy as stages_copy
    from lvd.curation.stages import ingest_dedup as stages

    init_ray(num_cpus=2)
    run = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    stages.run_ingest(stages.plan([str(root / "pool")], partition), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())
    stages_copy.run_copyfeat(run)
    single, parted = work / "single", work / "parted"
    for d in (single, parted):
        shutil.copytree(run, d)
    scale = CopyScaleConfig(part_rows=64, lsh_buckets=4, groups=4, partitions=4, uid_buckets=3, order_ranges=5)
    cfg = CopyDetectConfig(max_remove=0.9)  # the pipeline's default (flows.curate.DEDUP_MAX_REMOVE)
    stages_copy.run_copydetect(single, cfg, partitioned=False)
    stages_copy.run_copydetect(parted, cfg, partitioned=True, scale=scale)
    a = pq.read_table(single / "copydetect" / "duplicates.parquet")
    b = pq.read_table(parted / "copydetect" / "duplicates.parquet")
    sa, sb = (rundir.copydetect_output(r, "stats") for r in (single, parted))
    timing = ("seconds_", "partitioned")
    same_stats = {k: v for k, v in sa.items() if not k.startswith(timing)} == {
        k: v for k, v in sb.items() if not k.startswith(timing)
    }
    same_cal = rundir.copydetect_output(single, "calibration") == rundir.copydetect_output(parted, "calibration")
    parts = len(rundir.ingest_manifests(run))
    print(f"{root}/pool: {sa['images']} unique accepted images in {parts} ingest partitions")
    print(f"single task: {a.num_rows} duplicates, {sa['decided_links']} decided links, {sa['candidates']} candidates")
    print(f"partitioned: {b.num_rows} duplicates, {sb['decided_links']} decided links, {sb['candidates']} candidates")
    print(f"identical table: {b.equals(a)}; stats: {same_stats}; calibration: {same_cal}")
    assert b.equals(a) and same_stats and same_cal


def select_paths(root: Path, work: Path, seeds: bool = False) -> None:
    """The curate flow twice on DIR/pool (module doc): one-task cluster and retrieve stages, then
    partitioned ones; the same tables and shards, or an AssertionError naming the first difference.
    With `seeds`: retrieval by DIR/seeds (sample-based, k=32, capped at an eighth of the pool per
    seed set) instead of balanced sampling."""
    import shutil

    import pyarrow.parquet as pq
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from lvd.curation import ledger, rundir
    from lvd.curation.scale import pcluster, pretrieve, pseeds
    from lvd.flows.curate import curate
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    shutil.rmtree(work, ignore_errors=True)
    torch.manual_seed(0)
    embedder = str(export_hf(vit_tiny(img_size=112, depth=2), work / "embedder"))
    n_pool = sum(1 for p in (root / "pool").rglob("*") if p.is_file())
    common = dict(
        inputs=[str(root / "pool")], eval_sets=[str(root / "eval")], embedder=embedder, retrieval="hierarchical",
        target_size=n_pool // 4, partition_size=64, embed={"resize": 128, "crop": 112, "batch_size": 32},
    )  # fmt: skip
    if seeds:
        common.update(seeds=[str(root / "seeds")], retrieval="sample", target_size=n_pool // 8)
    pcluster.RECORDS_PER_TASK = pretrieve.RECORDS_PER_TASK = pseeds.RECORDS_PER_TASK = 100  # several buckets,
    pseeds.CHUNK = 8  # chunks and ranges; seeds queried a few at a time
    paths = {
        "one task": dict(cluster={"engine": "lloyd", "partitioned": False}, retrieve={"partitioned": False}),
        "partitioned": dict(cluster={"engine": "ray", "partitioned": True}, retrieve={"partitioned": True}),
    }
    if seeds:  # ten seeds: k=32, the paper's k for small seed sets
        for extra in paths.values():
            extra["retrieve"]["k"] = 32
    got = {}
    with prefect_test_harness():
        for name, extra in paths.items():
            out = work / name.replace(" ", "-")
            curate(out=str(out), **common, **extra)
            marks = [runner_marker(out, s) for s in ("cluster", "retrieve")]
            led = ledger.read_ledger(out).select(["source", "uid", "status"]).sort_by("source")
            manifest = pq.read_table(out / "shards" / "manifest.parquet").select(["uid"]).sort_by("uid")
            problems = ledger.verify_run(out).problems
            got[name] = (rundir.clusters(out), rundir.selection(out), led, manifest)
            counts = {
                str(k): int(v)
                for k, v in zip(*np.unique(led["status"].to_numpy(zero_copy_only=False), return_counts=True))
            }
            print(f"{name}: partitioned markers {[m.get('partitioned', False) for m in marks]}; ledger {counts}")
            print(f"  {rundir.clusters(out)[0].num_rows} clustered, {rundir.selection(out).num_rows} selected, "
                  f"{manifest.num_rows} shipped; verify problems: {problems}")  # fmt: skip
            assert not problems, (name, problems)
    (ca, sa, la, ma), (cb, sb, lb, mb) = got["one task"], got["partitioned"]
    same = {
        "clusters": ca[0].equals(cb[0]),
        "tree": ca[1].equals(cb[1]),
        "selection": sa.equals(sb),
        "ledger": la.equals(lb),
        "shards": ma.equals(mb),
    }
    print("identical:", same)
    assert all(same.values()), same


def runner_marker(run: Path, stage: str) -> dict:
    from lvd.curation import rundir, runner

    stems = {"cluster": "clusters", "retrieve": "selection"}
    return runner.read_marker(rundir.stage_dir(run, stage), stems[stage]) or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write dump N (1, 2 or 3) to DIR")
    w.add_argument("which", type=int, choices=(1, 2, 3))
    w.add_argument("dir", type=Path)
    r = sub.add_parser("read", help="read a pipeline run's ledger (OUT) against the dump's truth (DIR)")
    r.add_argument("dir", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("copy-paths", help="copy detection on DIR/pool: the single task against the partitioned path")
    c.add_argument("dir", type=Path)
    c.add_argument("work", type=Path, help="scratch folder (replaced)")
    c.add_argument("--partition-size", type=int, default=64, help="files per ingest partition")
    sp = sub.add_parser("select-paths", help="the curate flow on DIR: one-task against partitioned cluster/retrieve")
    sp.add_argument("dir", type=Path)
    sp.add_argument("work", type=Path, help="scratch folder (replaced)")
    sp.add_argument("--seeds", action="store_true", help="retrieve by DIR/seeds (sample-based, capped) instead")
    args = parser.parse_args()
    if args.cmd == "select-paths":
        select_paths(args.dir, args.work, args.seeds)
    elif args.cmd == "write":
        write(args.which, args.dir)
    elif args.cmd == "copy-paths":
        copy_paths(args.dir, args.work, args.partition_size)
    else:
        read(args.dir, args.out)


if __name__ == "__main__":
    main()
