"""Held-out copy recall of the hash dedup on an untuned dump: images, sizes and copy parameters
that no threshold was tuned on.

Originals (none used by the other benchmarks): Fashion-MNIST *test* products (black- and
white-background, 64-160 px), LFW rows 0-159 of `skimage.data.lfw_subset` (faces 0-99,
non-face patches 100-159, 64-250 px), skimage's colour photos (astronaut, chelsea, coffee,
rocket, hubble, immunohistochemistry, retina, colorwheel) and their quadrants at 200-400 px.
Copies by a hand-written PIL generator (not `lvd.curation.copies`), one per kind per copied
original, parameters drawn from `--seed`:
  resize 0.3-0.7 (PNG or JPEG q85), jpeg q15-40, bright ImageEnhance.Brightness x1.05-1.5
  (JPEG q85-95), gamma 0.6-0.8 / 1.25-1.6, contrast x0.55-0.85 / 1.15-1.4, combined (resize
  0.5-0.8, brightness x1.1-1.3, JPEG q35-60), crop 60-90% of each side, mirror, overlay
  (a line of text or skimage's logo on 3-8% of the area).
Look-alikes: every uncopied original (LFW faces, non-face patches) and `--products` more
Fashion-MNIST test products, each a distinct original.

Every file goes through the real ingest (`ingest_item`), one row per uid, then
`find_near_duplicates(DedupConfig())`: the dedup stage's decision without Ray
(benchmarks/dedup_quality.py --bench-dump does the same). A copy is found when it shares a
group with its original (either may be the representative). Printed: recall per kind,
distinct originals merged (with names) and every missed copy of the hash-dedup kinds.
Crop / mirror / overlay are copy detection's kinds (`lvd.curation.copydetect`); shown for
reference.

Run: .venv/bin/python benchmarks/copy_heldout.py [--seed 11] [--products 4000]
Against another tree: PYTHONPATH=/path/to/tree .venv/bin/python benchmarks/copy_heldout.py
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import pyarrow as pa
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

import lvd
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.sources import RawItem
from lvd.datasets import load_fashion_mnist

HASH_KINDS = ("resize", "jpeg", "bright", "gamma", "contrast", "combined")  # the hash dedup's job
OTHER_KINDS = ("crop", "mirror", "overlay")  # copy detection's job
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")  # fmt: skip


def jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=int(q))
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def either(rng: np.random.Generator, lo: tuple[float, float], hi: tuple[float, float]) -> float:
    return float(rng.uniform(*(lo if rng.random() < 0.5 else hi)))


def make_copies(im: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    """One copy per kind (HASH_KINDS + OTHER_KINDS); PIL only."""
    w, h = im.size

    def scaled(s: float) -> Image.Image:
        s = max(s, 32 / min(w, h))  # ingest rejects sides < 32
        return im.resize((max(32, round(w * s)), max(32, round(h * s))), Image.Resampling.LANCZOS)

    gamma = either(rng, (0.6, 0.8), (1.25, 1.6))
    lut = [round(255 * (v / 255) ** gamma) for v in range(256)]
    cw, ch = round(w * rng.uniform(0.6, 0.9)), round(h * rng.uniform(0.6, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    small = scaled(rng.uniform(0.3, 0.7))
    out = {
        "resize": png(small) if rng.random() < 0.5 else jpeg(small, 85),
        "jpeg": jpeg(im, rng.integers(15, 41)),
        "bright": jpeg(ImageEnhance.Brightness(im).enhance(rng.uniform(1.05, 1.5)), rng.integers(85, 96)),
        "gamma": jpeg(im.convert("RGB").point(lut * 3), 90),
        "contrast": jpeg(ImageEnhance.Contrast(im).enhance(either(rng, (0.55, 0.85), (1.15, 1.4))), 90),
        "combined": jpeg(
            ImageEnhance.Brightness(scaled(rng.uniform(0.5, 0.8))).enhance(rng.uniform(1.1, 1.3)), rng.integers(35, 61)
        ),
        "crop": jpeg(im.crop((x, y, x + cw, y + ch)), 88),
        "mirror": jpeg(ImageOps.mirror(im), 88),
        "overlay": jpeg(overlay(im, rng), 90),
    }
    return out


def overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A line of text or skimage's logo over 3-8% of the image, at a random place."""
    im = im.convert("RGB")
    w, h = im.size
    area = rng.uniform(0.03, 0.08) * w * h
    bw, bh = max(8, round(np.sqrt(area * 3))), max(6, round(np.sqrt(area / 3)))
    bw, bh = min(bw, w), min(bh, h)
    x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    if rng.random() < 0.5:
        d = ImageDraw.Draw(im)
        d.rectangle((x, y, x + bw, y + bh), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        d.text((x + 2, y + 1), "(c) lvd 2026", fill=(255, 255, 255))
    else:
        logo = Image.fromarray(skimage.data.logo()).resize((bw, bh))
        im.paste(logo, (x, y), logo)
    return im


def originals(rng: np.random.Generator, n_products: int):
    """[(name, image, copied?)]: copied originals first, then the look-alikes."""
    out = []
    pixels, _ = load_fashion_mnist("test")
    pick = rng.choice(len(pixels), size=80 + n_products, replace=False)
    for k, i in enumerate(pick):
        size = int(rng.choice([64, 80, 112, 160])) if k < 80 else int(rng.choice([64, 112]))
        a = pixels[i] if k % 2 == 0 else 255 - pixels[i]  # half on a white background
        im = Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        out.append((f"fm{i:05d}{'w' if k % 2 else 'b'}", im, k < 80))
    faces = skimage.data.lfw_subset()
    copied_faces = set(rng.choice(100, 40, replace=False).tolist()) | set(rng.choice(range(100, 160), 20).tolist())
    for i in range(160):
        size = int(rng.choice([64, 100, 150, 250]))
        im = Image.fromarray((faces[i] * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        out.append((f"lfw{i:03d}", im.convert("RGB"), i in copied_faces))
    for name in PHOTOS:
        full = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        side = int(rng.integers(200, 401))
        out.append((name, _fit(full, side), True))
        w, h = full.size
        for q, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, h // 2, w, h)]):
            out.append((f"{name}_q{q}", _fit(full.crop(box), int(rng.integers(200, 401))), True))
    return out


def _fit(im: Image.Image, side: int) -> Image.Image:
    s = side / max(im.size)
    return im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)


def build(seed: int, n_products: int):
    """(ingest table, name -> uid, name -> (original name, kind))."""
    rng = np.random.default_rng(seed)
    cfg, rows, uid_of, truth, seen = IngestConfig(), [], {}, {}, set()
    cols = ("uid", "width", "height", "phash", "dhash", "phash256", "thumb16", "nphash256", "cphash256", "sat16")
    cols = tuple(c for c in cols if c in INGEST_SCHEMA.names)  # an older tree may lack some

    def add(name: str, data: bytes, orig: str, kind: str) -> None:
        rec, _ = ingest_item(RawItem(name, data, None), cfg)
        if rec["status"] != "accepted":
            print(f"  rejected {name}: {rec['reason']}")
            return
        uid_of[name], truth[name] = rec["uid"], (orig, kind)
        if rec["uid"] not in seen:
            seen.add(rec["uid"])
            rows.append({c: rec[c] for c in cols})

    for name, im, copied in originals(rng, n_products):
        add(name, png(im), name, "original")
        if copied:
            for kind, data in make_copies(im, rng).items():
                add(f"{name}__{kind}", data, name, kind)
    schema = pa.schema([INGEST_SCHEMA.field(c) for c in cols])
    return pa.Table.from_pylist(rows, schema=schema), uid_of, truth


def report(table: pa.Table, uid_of: dict, truth: dict, dups: pa.Table) -> None:
    rep = dict(zip(table["uid"].to_pylist(), table["uid"].to_pylist()))
    rep.update(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    group = {n: rep[u] for n, u in uid_of.items()}
    found: dict[str, list[str]] = {k: [] for k in HASH_KINDS + OTHER_KINDS}
    missed: dict[str, list[str]] = {k: [] for k in HASH_KINDS + OTHER_KINDS}
    for name, (orig, kind) in truth.items():
        if kind != "original":
            (found if group[name] == group[orig] else missed)[kind].append(name)
    print("recall per kind (%, found/all):")
    for kinds in (HASH_KINDS, OTHER_KINDS):
        print("  " + ", ".join(f"{k} {100 * len(found[k]) / max(1, len(found[k]) + len(missed[k])):.1f} "
                               f"({len(found[k])}/{len(found[k]) + len(missed[k])})" for k in kinds))  # fmt: skip
    hash_found = sum(len(found[k]) for k in HASH_KINDS)
    hash_all = hash_found + sum(len(missed[k]) for k in HASH_KINDS)
    print(f"  hash-dedup kinds together: {100 * hash_found / hash_all:.1f}% ({hash_found}/{hash_all})")
    groups: dict[str, list[str]] = {}
    for name, (_, kind) in truth.items():
        if kind == "original":
            groups.setdefault(group[name], []).append(name)
    merged = [g for g in groups.values() if len(g) > 1]
    print(f"distinct originals merged: {sum(map(len, merged))} in {len(merged)} groups {merged[:10]}")
    for k in HASH_KINDS:
        if missed[k]:
            print(f"  missed {k}: {sorted(missed[k])}")
    kept = len(table) - len(dups)
    print(f"removed {len(dups)} of {len(table)} unique images ({kept} kept)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11, help="draws the originals, sizes and copy parameters")
    parser.add_argument("--products", type=int, default=4000, help="uncopied Fashion-MNIST test products (look-alikes)")
    args = parser.parse_args()
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}  (seed {args.seed}, lvd from "
          f"{lvd.__file__.rsplit('/lvd/', 1)[0]})")  # fmt: skip
    t0 = time.perf_counter()
    table, uid_of, truth = build(args.seed, args.products)
    n_orig = sum(k == "original" for _, k in truth.values())
    print(f"pool: {len(truth)} files, {table.num_rows} unique, {n_orig} distinct originals, "
          f"hashed in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    t0 = time.perf_counter()
    dups = find_near_duplicates(table, DedupConfig())
    print(f"hash dedup (DedupConfig() defaults): {time.perf_counter() - t0:.1f}s")
    report(table, uid_of, truth, dups)


if __name__ == "__main__":
    main()
