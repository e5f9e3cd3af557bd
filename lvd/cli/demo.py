"""`lvd demo`: the whole pipeline on a small built-in sample dump, on CPU, with no setup.

The dump (real photos shipped with scikit-image / scikit-learn, copies of them, broken files,
odd encodings, a hostile tar and a Parquet file) is written under OUT/dump and curated into
OUT/run (then verified and its accounting printed); a `tiny` ViT is pretrained briefly on
OUT/run/shards into OUT/pretrain, evaluated by k-NN on a small labelled folder
(Fashion-MNIST when installed, else crops of three photos) and exported to OUT/hf.
A few minutes on 2 CPU cores. Each demo starts over: it rebuilds the dump and deletes the
previous demo's run/, pretrain/, hf/ (the pipeline's --overwrite); a demo running in the same
folder at the same time is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lvd.cli.checks import problems, refuse
from lvd.cli.options import add_curate_options, add_training_options
from lvd.cli.pipeline import precheck, run_pipeline

DEMO_STEPS = 30


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a built-in sample dump (CPU, offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", default="lvd-demo", metavar="DIR", help="folder for the sample dump and the run (default: ./lvd-demo)"
    )
    add_training_options(p, max_steps=DEMO_STEPS)
    add_curate_options(p)
    p.set_defaults(func=main, check=check, partition_size=32, batch_size=16, overwrite=True)


def check(args: argparse.Namespace) -> int:
    """Before anything is built: the arguments, and that no other demo works in --out."""
    if found := problems(args, "demo"):
        return refuse(found)
    return precheck(dict(out=str(Path(args.out).resolve()), inputs=[], mode="overwrite", curate_options={}))


def main(args: argparse.Namespace) -> int:
    from lvd.curation.demo import build_demo_dump, build_knn_folders

    out = Path(args.out).resolve()
    print(f"[1/3] building the sample dump under {out / 'dump'} ...", flush=True)
    dump = build_demo_dump(out / "dump")
    print(f"      inputs: {', '.join(dump.inputs)}", flush=True)
    print(f"[2/3] building labelled k-NN folders under {out / 'knn'} ...", flush=True)
    train, val = build_knn_folders(out / "knn")
    print(
        f"[3/3] Prefect flow `pipeline`: curate into {out / 'run'} -> pretrain `{args.recipe}` "
        f"for {args.max_steps} steps -> k-NN eval -> export to {out / 'hf'} ...",
        flush=True,
    )
    return run_pipeline(args, inputs=dump.inputs, out=out, knn_train=str(train), knn_val=str(val))
