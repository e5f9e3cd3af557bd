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

Run: .venv/bin/python benchmarks/dedup_quality.py [--fashion 3000]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.sources import RawItem

COLUMNS = ("uid", "width", "height", "phash", "dhash", "phash256", "thumb16", "nphash256")  # what dedup reads
H64 = dict(verify_radius=None, max_thumb_residual=None)  # 64-bit hashes only
SETTINGS = {
    "default": DedupConfig(),  # 8/8 + pHash-256 <= 16 + thumbnail <= 30, equalised <= 20, clipped <= 28
    "no clipped channel": DedupConfig(clipped_verify_radius=None),
    "no equalised channel": DedupConfig(equalised_radius=None),
    "clipped 32": DedupConfig(clipped_verify_radius=32),
    "clipped 32, dHash 12": DedupConfig(clipped_verify_radius=32, dhash_radius=12),
    "hashes before (no new channels)": DedupConfig(clipped_verify_radius=None, equalised_radius=None),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=20000, help="distinct Fashion-MNIST images in the pool")
    args = parser.parse_args()
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
