"""`lvd verify RUN`: check a run's accounting (every input exactly once, with its reason), every
shard tar against RUN/shards/manifest.parquet (sha256, size, keys, uids, decodable images) and
the manifest against the ledger (every `sharded` uid shipped exactly once and nothing else; no
duplicate or decontaminated image in any shard), and the seed / eval-set runs' own ledgers."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a run folder's accounting and shards; exits 1 and says what is broken"
    )
    p.add_argument("run", metavar="RUN", help="run folder written by `lvd curate`")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lvd.curation.ledger import format_report, verify_run

    report = verify_run(args.run)
    print(format_report(report))
    return 0 if report.ok else 1
