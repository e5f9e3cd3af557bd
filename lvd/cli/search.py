"""`lvd search --index INDEX --query IMG -k 10`: nearest indexed images, listed and as a montage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="find the images nearest to a query image in an lvd index",
        description="Embed the query as the indexed images were embedded (model, size and resize "
        "from INDEX/meta.json), print the k nearest (rank, cosine, id, path) and write a montage "
        "PNG: the query on the left, then the neighbours with rank and cosine under each.",
    )
    p.add_argument("--index", required=True, type=Path, metavar="INDEX", help="an lvd index --out folder")
    p.add_argument("--query", required=True, type=Path, metavar="IMG", help="query image file")
    p.add_argument("-k", type=int, default=10, help="neighbours to list (default 10)")
    p.add_argument(
        "--model", default=None, help="backbone to embed the query with (default: the one named in INDEX/meta.json)"
    )
    p.add_argument(
        "--montage",
        type=Path,
        default=None,
        help="montage PNG to write (default: QUERY_STEM.neighbours.png in the current folder)",
    )
    p.add_argument("--tile", type=int, default=160, help="montage tile side in pixels (default 160)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default: the index's)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.tools.images import open_image
    from lvd.tools.montage import write_montage
    from lvd.tools.search import SearchIndex, search_images

    if args.k < 1:
        print(f"lvd search: -k {args.k}: ask for at least one neighbour", file=sys.stderr)
        return 2
    try:
        index = SearchIndex.load(args.index, nprobe=args.nprobe)
        # decoded as the indexed images were (JPEG draft down to the resize side)
        query = open_image(str(args.query), min_side=index.meta["resize"])
        hits = search_images(index, [query], args.k, model=args.model, device=args.device)[0]
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError; Pillow's too
        print(f"lvd search: {e}", file=sys.stderr)
        return 2
    for h in hits:
        print(f"{h.rank:3d}  {h.score:.4f}  {h.id}  {h.path}")
    out = args.montage or Path(f"{args.query.stem}.neighbours.png")
    write_montage(query, hits, out, tile=args.tile, query_label=args.query.name)
    print(f"montage: {out}")
    return 0
