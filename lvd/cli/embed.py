"""`lvd embed --model M --images DIR_OR_SHARDS --out OUT`: CLS (and patch) features to Parquet/npy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvd.cli.options import MODEL_HELP


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a folder of images or WebDataset shards with a DINOv2 backbone",
        description="CLS features (and with --patches the patch-token maps, registers excluded) of "
        "every image, written to OUT as embeddings.parquet (row, id, path, cls), cls.npy "
        "(float32 N x D), patches.npy (float16 N x h x w x D), skipped.parquet (unreadable "
        "inputs with a reason) and meta.json. Large inputs run on Ray actors.",
    )
    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR_OR_SHARDS",
        help="a folder tree of images, or WebDataset shards: a .tar, a shard-{000000..000009}.tar pattern, or a folder of shard-*.tar",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument(
        "--size",
        type=int,
        default=224,
        help="side of the centre crop fed to the backbone, a multiple of its patch size (default 224)",
    )
    p.add_argument(
        "--resize", type=int, default=None, help="shorter side before the crop (default size * 8/7: 256 for 224)"
    )
    p.add_argument("--patches", action="store_true", help="also write patch-token maps (float16)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--chunk", type=int, default=256, help="folder images per unit of work (a shard is one unit)")
    ray = p.add_mutually_exclusive_group()
    ray.add_argument(
        "--ray", dest="ray", action="store_true", default=None, help="always run on Ray actors (one model load each)"
    )
    ray.add_argument("--no-ray", dest="ray", action="store_false", help="always run in this process")
    p.add_argument(
        "--ray-above",
        type=int,
        default=2000,
        help="without --ray/--no-ray, use Ray when the input holds more images than this (default 2000)",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="Ray actors (default: one per GPU, else one; a CPU model already uses every core)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.curation.actor_runner import ActorConfig
    from lvd.tools.embed import EmbedConfig, embed
    from lvd.tools.features import FeatureConfig

    if not Path(args.model).expanduser().exists():
        print(f"lvd embed: --model {args.model} does not exist; pass {MODEL_HELP}", file=sys.stderr)
        return 2
    try:
        features = FeatureConfig(
            size=args.size, resize=args.resize, patches=args.patches, batch_size=args.batch_size, device=args.device
        )
        cfg = EmbedConfig(
            features=features,
            chunk=args.chunk,
            ray=args.ray,
            ray_above=args.ray_above,
            actors=ActorConfig(n_actors=args.actors),
        )
    except ValueError as e:
        print(f"lvd embed: {e}", file=sys.stderr)
        return 2
    if args.ray_address:
        from lvd.curation.runner import init_ray

        init_ray(args.ray_address)
    emb = embed(args.model, args.images, args.out, cfg)
    grid = f", patches {emb.patches_NhwD.shape[1:]}" if emb.patches_NhwD is not None else ""
    where = "on Ray" if emb.meta["ray"] else "in process"
    print(
        f"embedded {len(emb.ids)} images {where} (D={emb.meta['dim']}{grid}) to {args.out}; "
        f"{len(emb.skipped)} skipped (see {args.out / 'skipped.parquet'})"
    )
    return 0
