"""`lvd curate`: run the Prefect flow `curate` (ingest, dedup, ledger) over input dumps.

Where it runs: Ray joins `--ray-address` or `RAY_ADDRESS` when given, else starts
locally with every CPU. On a cluster every node must see the inputs and the run folder at
the same paths (a shared filesystem): Ray tasks read inputs and write partition files.

Prefect talks to `PREFECT_API_URL` when set; otherwise Prefect 3 starts a temporary local
server on a database in `PREFECT_HOME`, which lvd defaults to `~/.lvd/prefect` (one place
for every run, so `PREFECT_HOME=~/.lvd/prefect prefect server start` shows them all).

A run folder is resumable: run the same command again after a crash or kill and done
partitions (those with a done-marker matching input and config) are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_PREFECT_HOME = Path("~/.lvd/prefect")


def prepare_prefect_env() -> str:
    """Pick PREFECT_HOME before Prefect is imported; returns a line saying where runs go."""
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect server: {os.environ['PREFECT_API_URL']}"
    home = os.environ.setdefault("PREFECT_HOME", str(DEFAULT_PREFECT_HOME.expanduser()))
    Path(home).mkdir(parents=True, exist_ok=True)
    # The temporary server migrates a new database on first start: on a busy 2-core machine
    # that takes longer than Prefect's 20 s default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return (
        f"Prefect runs are stored in {home}; to browse them run:\n"
        f"  PREFECT_HOME={home} prefect server start   # then open http://127.0.0.1:4200"
    )


def add_curate_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `lvd curate` and `lvd demo`."""
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--partition-size", type=int, default=256,
                   help="files (or parquet rows) per partition: the unit of work, retry and resume")
    p.add_argument("--min-side", type=int, default=32,
                   help="reject images whose shorter side is below this many pixels")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="reject images with more pixels than this (checked before decoding)")
    p.add_argument("--phash-radius", type=int, default=None,
                   help="max pHash Hamming distance of near-duplicates (default: dedup's)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray retries of a partition whose worker process or node died")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "curate", help="curate image dumps into a run folder (ingest, dedup, ledger)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", action="append", required=True, metavar="DUMP",
                   help="folder of images, tar archive, parquet file or folder of them; repeatable")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (reused to resume)")
    add_curate_options(p)
    p.set_defaults(func=main)


def flow_kwargs(args: argparse.Namespace) -> dict:
    dedup = {} if args.phash_radius is None else {"phash_radius": args.phash_radius}
    return dict(
        partition_size=args.partition_size,
        ingest={"min_side": args.min_side, "max_pixels": args.max_pixels},
        dedup=dedup,
        max_retries=args.max_retries,
        ray_address=args.ray_address,
    )


def run_curate(inputs: list[str], out: str, **kwargs) -> int:
    """Run the flow and print the accounting; 0 when every input is accounted for."""
    inputs = [str(i) for i in inputs]
    if twice := sorted({i for i in inputs if inputs.count(i) > 1}):
        print(f"error: --input given more than once (each input must count once): {', '.join(twice)}",
              file=sys.stderr)
        return 2
    where = prepare_prefect_env()
    from lvd.curation.ledger import format_report, verify_run
    from lvd.flows.curate import curate

    curate(inputs=inputs, out=str(out), **kwargs)
    report = verify_run(Path(out))
    print(format_report(report))
    print(where)
    return 0 if report.ok else 1


def main(args: argparse.Namespace) -> int:
    return run_curate(args.input, args.out, **flow_kwargs(args))
