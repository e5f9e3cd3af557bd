"""`lvd demo`: curate a small built-in sample dump end to end, on CPU, with no setup.

The dump (real photos shipped with scikit-image / scikit-learn, copies of them, broken files,
odd encodings, a hostile tar and a Parquet file) is written under OUT/dump and curated into
OUT/run; then the run is verified and its accounting printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lvd.flows.commands.curate import add_curate_options, flow_kwargs, run_curate


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="curate a built-in sample dump end to end (CPU, offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="lvd-demo", metavar="DIR",
                   help="folder for the sample dump and the run (default: ./lvd-demo)")
    add_curate_options(p)
    p.set_defaults(func=main, partition_size=32)


def main(args: argparse.Namespace) -> int:
    from lvd.curation.demo import build_demo_dump

    out = Path(args.out).resolve()
    print(f"[1/2] building the sample dump under {out / 'dump'} ...", flush=True)
    dump = build_demo_dump(out / "dump")
    print(f"      inputs: {', '.join(dump.inputs)}", flush=True)
    print(f"[2/2] curating into {out / 'run'} (Prefect flow `curate` over Ray) ...", flush=True)
    code = run_curate(dump.inputs, str(out / "run"), **flow_kwargs(args))
    # Later: [3/3] pretrain a small ViT on OUT/run/shards (lvd pretrain) once curation
    # writes shards; keep the steps above unchanged and append it here.
    print(f"run folder: {out / 'run'}  (ledger: {out / 'run' / 'ledger.parquet'})")
    print(f"check it again any time with: lvd verify {out / 'run'}")
    return code
