"""`lvd verify RUN`: check a run's accounting (every input exactly once, with its reason), every
shard tar against RUN/shards/manifest.parquet (sha256, size, keys, uids, decodable images) and
the manifest against the ledger (every `sharded` uid shipped exactly once and nothing else; no
duplicate or decontaminated image in any shard), and the seed / eval-set runs' own ledgers.
The ledger's parts are checked in parallel as Ray tasks (a local Ray, or --ray-address), then
across parts by uid range; the findings come back as one report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a run folder's accounting and shards; exits 1 and says what is broken"
    )
    p.add_argument(
        "run", metavar="RUN", help="run folder written by `lvd curate` (an `lvd pipeline --out` folder: its run/)"
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to check on (default: RAY_ADDRESS, else a local Ray on this machine's CPUs)",
    )
    p.set_defaults(func=main)


def run_folder(path: str) -> str:
    """The run folder to check: `path`, or its `run/` when `path` is an `lvd pipeline --out`
    folder (its run.json says kind "pipeline"; the curated run is inside)."""
    from pathlib import Path

    from lvd.runfolder import PIPELINE_RUN, RunFolderError, read_record

    try:
        record = read_record(Path(path))
    except RunFolderError:
        return path  # verify_run says what is wrong with the folder
    if record and record.get("kind") == "pipeline":
        inner = str(Path(path) / PIPELINE_RUN)
        print(f"{path} is an `lvd pipeline` folder: checking its run folder {inner}")
        return inner
    return path


def main(args: argparse.Namespace) -> int:
    from lvd.curation import runner
    from lvd.curation.ledger import format_report, verify_run

    runner.init_ray(getattr(args, "ray_address", None))
    report = verify_run(run_folder(args.run))
    print(format_report(report))
    return 0 if report.ok else 1
