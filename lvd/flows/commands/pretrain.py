"""`lvd pretrain`: train DINOv2 on curation shards.

One process by default (CPU, or a GPU when present); `--nproc-per-node N` starts N ranks on
this machine through torch.distributed's elastic launcher (what `torchrun --standalone` does)
and shards the model with FSDP2. For several machines, start the same command under torchrun
yourself (`torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m lvd.flows.cli
pretrain ...`): training joins the process group torchrun sets up.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a DINOv2 ViT on WebDataset shards written by `lvd curate`"
    )
    p.add_argument("--shards", required=True, nargs="+", metavar="SHARDS",
                   help="shard folder (e.g. RUN/shards), tar files, or {000000..000009} brace patterns")
    p.add_argument("--recipe", default="vits14",
                   help="named recipe: tiny, vits14, vitb14, vitl14, vitg14 (default: vits14)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: config.json, metrics.jsonl, checkpoints/, pictures/")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (schedules still follow the recipe's length)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step and process (default: the recipe's)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in --out, if any")
    p.add_argument("--num-workers", type=int, default=2,
                   help="data-loading worker processes (0: load in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seed for model init, crops and masks")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="ranks to start on this machine (FSDP2; gloo on CPU, NCCL on GPUs); "
                        "--batch-size is then per rank")
    p.add_argument("--deterministic", action="store_true",
                   help="use deterministic torch algorithms (bit-exact resume on CPU; slower)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lvd.pretrain.data import expand_shards
    from lvd.pretrain.recipes import get_recipe
    from lvd.pretrain.train import TrainConfig, train

    try:
        shards = tuple(expand_shards(args.shards))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"lvd pretrain: {e}") from None
    recipe = get_recipe(args.recipe)
    if args.batch_size is not None:
        recipe = replace(recipe, batch_size=args.batch_size)
    if args.nproc_per_node < 1:
        raise SystemExit(f"lvd pretrain: --nproc-per-node {args.nproc_per_node}: use 1 or more")
    cfg = TrainConfig(
        shards=shards, recipe=recipe, out=args.out,
        max_steps=args.max_steps, resume=args.resume, num_workers=args.num_workers,
        seed=args.seed, device=args.device, deterministic=args.deterministic,
    )
    if args.nproc_per_node > 1:
        from lvd.pretrain.distributed import train_on_ranks

        result = train_on_ranks(cfg, args.nproc_per_node)
    else:
        result = train(cfg)
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    print(f"trained steps {result.start_step}..{result.end_step} of recipe {recipe.name}; "
          f"last loss {last:.4f}; checkpoint {result.last_checkpoint}")
    return 0
