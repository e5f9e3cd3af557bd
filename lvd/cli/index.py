"""`lvd index --embeddings OUT --out INDEX`: a cosine Faiss index over `lvd embed` output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help="build a cosine Faiss index (exact or IVF) over lvd embed output",
        description="Index the L2-normalised CLS vectors of an lvd embed folder. INDEX gets "
        "index.faiss, items.parquet (row, id, path) and meta.json (the model and sizes the "
        "images were embedded with, used by lvd search).",
    )
    p.add_argument("--embeddings", required=True, type=Path, metavar="OUT", help="an lvd embed --out folder")
    p.add_argument("--out", required=True, type=Path, metavar="INDEX", help="index folder (created)")
    p.add_argument(
        "--kind",
        choices=("auto", "exact", "ivf"),
        default="auto",
        help="exact (IndexFlatIP), ivf (IndexIVFFlat), or auto: exact below --exact-below vectors",
    )
    p.add_argument("--exact-below", type=int, default=200_000, help="auto: exact search below this many vectors")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 * sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query (default 32)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.tools.search import IndexBuildConfig, build_index_dir

    try:
        cfg = IndexBuildConfig(kind=args.kind, exact_below=args.exact_below, nlist=args.nlist, nprobe=args.nprobe)
        index = build_index_dir(args.embeddings, args.out, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"lvd index: {e}", file=sys.stderr)
        return 2
    m = index.meta
    lists = f", {m['nlist']} lists, nprobe {m['nprobe']}" if m["kind"] == "ivf" else ""
    print(f"indexed {m['count']} images (D={m['dim']}, {m['kind']}{lists}) to {args.out}")
    return 0
