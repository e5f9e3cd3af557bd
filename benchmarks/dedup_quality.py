"""Dedup quality on real images: recall per copy kind and wrongly merged distinct originals.

Pool: the real photos of `lvd.curation.copies` (with quadrant crops of the two largest), one
copy of each kind per photo, and N distinct Fashion-MNIST images upscaled to 64 px (hard
negatives: flat background, similar silhouettes). Every image goes through the real ingest
(`ingest_item`) for its hashes, then `find_near_duplicates` runs once per setting.

- recall[kind]: fraction of copies whose group representative is their original's
- merged originals: distinct originals (photos + Fashion-MNIST) that share a group with another
  original: every one of them is a false merge
- settings: the default (64-bit pHash/dHash <= 8, 256-bit pHash `phash256` <= 16, 16x16
  thumbnail `thumb16` residual <= 30 gray levels) and ablations; all columns come from ingest

Exact copies have the original's bytes, hence its uid; the ledger merges them before dedup.
Here they get their own uid so that the hash path is exercised too.

`--bench-dump [DIR]`: the same on `copies.write_bench_dump(seed=0)` (benchmarks/copy_quality.py's
dump, row (a) without Ray; built in a temp folder unless DIR holds one): recall per copy kind,
merged originals, and the equalised channel's check (`dedup.unclipped_residual`) on the
brightened / contrast copies against the closest distinct pairs (its candidates among the
dump's originals and N Fashion-MNIST products, black- and white-background).

Run: .venv/bin/python benchmarks/dedup_quality.py [--fashion 3000] [--bench-dump [DIR]]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from lvd.curation import copies
from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos
from lvd.curation.dedup import (
    DedupConfig,
    equalised_candidates,
    find_near_duplicates,
    table_rows,
    unclipped_residual,
)  # fmt: skip
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.sources import RawItem

COLUMNS = ("uid", "width", "height", "phash", "dhash", "phash256", "thumb16", "nphash256", "cphash256", "sat16")
H64 = dict(verify_radius=None, max_thumb_residual=None)  # 64-bit hashes only
WIDE_RADIUS = 32  # distinct pairs this close in the equalised codes, for the residual report
SETTINGS = {
    "default": DedupConfig(),  # 8/8 + pHash-256 <= 16 + thumbnail <= 30, equalised <= 24 + residual, clipped <= 28
    "no clipped channel": DedupConfig(clipped_verify_radius=None),
    "no equalised channel": DedupConfig(equalised_radius=None),
    "no soft channel": DedupConfig(soft_max_residual=None),
    "soft limit 14": DedupConfig(soft_max_residual=14.0),  # 2x the default: look-alikes stay >= ~15
    "no flatness guard": DedupConfig(min_thumb_spread=0.0),
    "equalised unchecked": DedupConfig(equalised_sure_radius=24),  # every candidate <= 24 bits linked
    "equalised residual only": DedupConfig(equalised_sure_radius=0),
    "clipped 32": DedupConfig(clipped_verify_radius=32),
    "clipped 32, dHash 12": DedupConfig(clipped_verify_radius=32, dhash_radius=12),
    "hashes before (no new channels)": DedupConfig(
        clipped_verify_radius=None, equalised_radius=None, soft_max_residual=None
    ),
    "64bit 8/8": DedupConfig(phash_radius=8, dhash_radius=8, equalised_radius=None, clipped_verify_radius=None, **H64),
}


def build_pool(n_fashion: int) -> tuple[pa.Table, dict[str, str], dict[str, str]]:
    """(ingest-like table, copy uid -> original uid, copy uid -> kind); originals end in ':orig'."""
    cfg = IngestConfig()
    rows, original_of, kind_of = [], {}, {}

    def add(uid: str, data: bytes) -> None:
        rec, _ = ingest_item(RawItem(uid, data, None), cfg)
        assert rec["status"] == "accepted", (uid, rec["reason"])
        rows.append({k: rec[k] for k in COLUMNS[1:]} | {"uid": uid})

    for seed, (name, img) in enumerate(real_photos(crops=True)):
        add(f"{name}:orig", encode_original(img))
        for kind, data in make_copies(img, seed=seed).items():
            add(f"{name}:{kind}", data)
            original_of[f"{name}:{kind}"], kind_of[f"{name}:{kind}"] = f"{name}:orig", kind
    for i, img in enumerate(fashion_mnist(n_fashion, seed=0)) if n_fashion else []:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        add(f"fashion{i:05d}:orig", buf.getvalue())
    schema = pa.schema([INGEST_SCHEMA.field(c) for c in COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema), original_of, kind_of


def score(table: pa.Table, dups: pa.Table, original_of: dict, kind_of: dict) -> dict:
    rep = {u: u for u in table["uid"].to_pylist()}
    rep.update(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    recall = {}
    for kind in COPY_KINDS:
        copies = [u for u, k in kind_of.items() if k == kind]
        recall[kind] = np.mean([rep[u] == rep[original_of[u]] for u in copies])
    group_originals: dict[str, list[str]] = {}
    for u in rep:
        if u.endswith(":orig"):
            group_originals.setdefault(rep[u], []).append(u)
    merged = sum(len(g) for g in group_originals.values() if len(g) > 1)
    merged_fashion = sum(sum(u.startswith("fashion") for u in g) for g in group_originals.values() if len(g) > 1)
    return dict(recall=recall, merged=merged, merged_fashion=merged_fashion)


def bench_dump_pool(root: Path, n_fashion: int) -> tuple[pa.Table, copies.BenchTruth, dict[str, str]]:
    """(one row per uid of the dump's accepted files + Fashion-MNIST products, the truth,
    file -> uid). Products are added black- and white-background (the dump's products are
    white-background): `fashion:k` and `fashion-inv:k`, each a distinct original."""
    truth = copies.BenchTruth.load(root) if (root / "truth.json").exists() else copies.write_bench_dump(root, seed=0)
    cfg, rows, uid_of, seen = IngestConfig(), [], {}, set()

    def add(name: str, data: bytes) -> None:
        rec, _ = ingest_item(RawItem(name, data, None), cfg)
        if rec["status"] != "accepted":
            return
        uid_of[name] = rec["uid"]
        if rec["uid"] not in seen:  # the ledger keeps one row per uid (exact copies)
            seen.add(rec["uid"])
            rows.append({k: rec[k] for k in COLUMNS})

    for rel in truth.files:
        add(rel, (root / rel).read_bytes())
    for i, img in enumerate(fashion_mnist(n_fashion, seed=0)) if n_fashion else []:
        for tag, im in (("fashion", img), ("fashion-inv", Image.fromarray(255 - np.asarray(img)))):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            add(f"{tag}:{i}", buf.getvalue())
    schema = pa.schema([INGEST_SCHEMA.field(c) for c in COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema), truth, uid_of


def bench_dump_report(root: Path, n_fashion: int, cfg: DedupConfig) -> None:
    """Row (a) on the bench dump, and the equalised channel's check: copies vs distinct pairs."""
    t0 = time.perf_counter()
    table, truth, uid_of = bench_dump_pool(root, n_fashion)
    print(f"bench dump {root}: {table.num_rows} unique images ({n_fashion} Fashion-MNIST x2), "
          f"hashed in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    dups = find_near_duplicates(table, cfg)
    rep = dict(zip(table["uid"].to_pylist(), table["uid"].to_pylist()))
    rep.update(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    orig_of = {f["original"]: rel for rel, f in truth.files.items() if f["kind"] == "original"}
    found: dict[str, list[bool]] = {}
    for rel, f in truth.files.items():
        if f["kind"] not in ("original", "broken"):
            found.setdefault(f["kind"], []).append(rep[uid_of[rel]] == rep[uid_of[orig_of[f["original"]]]])
    originals = list(orig_of.values()) + [n for n in uid_of if n.startswith("fashion")]
    groups: dict[str, list[str]] = {}
    for name in originals:
        groups.setdefault(rep[uid_of[name]], []).append(name)
    merged = [g for g in groups.values() if len(g) > 1]
    print("recall per copy kind (%): " + ", ".join(f"{k} {100 * np.mean(v):.1f}" for k, v in found.items()))
    print(f"distinct originals merged: {sum(map(len, merged))} {merged[:6]}")
    for kind in ("brightened", "contrast"):
        missed = [rel for rel, f in truth.files.items()
                  if f["kind"] == kind and rep[uid_of[rel]] != rep[uid_of[orig_of[f["original"]]]]]  # fmt: skip
        print(f"  missed {kind}: {[Path(m).name for m in missed]}")
    residual_report(table, truth, uid_of, orig_of, cfg)


def residual_report(table: pa.Table, truth, uid_of: dict, orig_of: dict, cfg: DedupConfig) -> None:
    """`unclipped_residual` of brightened / contrast copies with their originals, and of the
    equalised channel's candidate pairs of distinct originals (the pairs it must refuse)."""
    rows = table_rows(table, cfg)
    pos = {u: i for i, u in enumerate(table["uid"].to_pylist())}

    def residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return unclipped_residual(rows.eq_thumb[a], rows.eq_thumb[b], rows.saturated[a], rows.saturated[b],
                                  min_cells=cfg.min_unclipped_cells)  # fmt: skip

    for kind in ("brightened", "contrast"):
        pairs = [(pos[uid_of[rel]], pos[uid_of[orig_of[f["original"]]]]) for rel, f in truth.files.items()
                 if f["kind"] == kind]  # fmt: skip
        r = residual(*np.array(pairs).T)
        print(f"  {kind} copies vs original: {_quantiles(r)}")
    original = {pos[uid_of[n]] for n in list(orig_of.values()) + [n for n in uid_of if n.startswith("fashion")]}
    name_of = {pos[u]: n for n, u in uid_of.items()}
    plain = rows.equalised[:, 0]
    for radius in (cfg.equalised_radius, WIDE_RADIUS):  # the channel's candidates, then a wider net
        a, b = equalised_candidates(rows.equalised, radius)
        distinct = np.array([i in original and j in original for i, j in zip(a.tolist(), b.tolist())], bool)
        a, b = a[distinct], b[distinct]
        bits = np.bitwise_count(plain[a] ^ plain[b]).sum(axis=1)
        r = residual(a, b)
        sure = int((bits <= cfg.equalised_sure_radius).sum())
        print(f"  distinct originals within {radius} bits ({len(a)} pairs): {_quantiles(r)}; "
              f"plain codes <= {cfg.equalised_sure_radius} bits (linked unchecked): {sure}")  # fmt: skip
        closest = ", ".join(f"{name_of[a[i]]}~{name_of[b[i]]} {r[i]:.1f}" for i in np.argsort(r)[:4])
        print(f"    closest: {closest}")


def _quantiles(r: np.ndarray) -> str:
    f = r[np.isfinite(r)]
    if not len(f):
        return f"n={len(r)}, all inf"
    q = np.percentile(f, [0, 50, 90, 100])
    return f"n={len(r)} (inf {len(r) - len(f)}) min {q[0]:.1f} median {q[1]:.1f} p90 {q[2]:.1f} max {q[3]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=20000, help="distinct Fashion-MNIST images in the pool")
    parser.add_argument(
        "--bench-dump", nargs="?", const="", default=None, metavar="DIR",
        help="score copies.write_bench_dump(seed=0) instead (DIR: an existing dump; default: a temp folder)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.bench_dump is not None:
        root = Path(args.bench_dump) if args.bench_dump else Path(tempfile.mkdtemp(prefix="lvd-dedupq-")) / "dump"
        bench_dump_report(root, args.fashion, DedupConfig())
        return
    t0 = time.perf_counter()
    table, original_of, kind_of = build_pool(args.fashion)
    n_orig = sum(u.endswith(":orig") for u in table["uid"].to_pylist())
    print(f"pool: {table.num_rows} images ({n_orig} distinct originals, {len(kind_of)} copies), "
          f"hashed in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    header = f"{'setting':18s} " + " ".join(f"{k[:9]:>9s}" for k in COPY_KINDS) + "  merged(fashion)  time"
    print(header)
    for name, cfg in SETTINGS.items():
        t = time.perf_counter()
        dups = find_near_duplicates(table, cfg)
        elapsed = time.perf_counter() - t
        s = score(table, dups, original_of, kind_of)
        cells = " ".join(f"{s['recall'][k]:9.2f}" for k in COPY_KINDS)
        print(f"{name:18s} {cells}  {s['merged']:6d} ({s['merged_fashion']:4d})  {elapsed:5.2f}s")


if __name__ == "__main__":
    main()
