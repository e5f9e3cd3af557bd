"""The ledger stage against ingest on the same run, in one process (issue 14's target).

Writes N small JPEG photos, ingests them on the local Ray (`stages.run_ingest`: the baseline),
runs hash dedup, then times `ledger.write_parts` (the partitioned writer: three rounds of Ray
tasks, one part per ingest partition, done-marker last), `ledger.verify_run` (per-part and
per-uid-range checks as Ray tasks; no shards, so no shard checks) and, for comparison, the
single-process reference `ledger.build_ledger` + one durable write (what the ledger stage did
before it was partitioned). The target: the ledger at most a fifth of ingest's time.

    .venv/bin/python benchmarks/ledger.py [--n 10000] [--side 64] [--cpus 2] [--partition-size 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lvd import durable
from lvd.curation import ledger, runner
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.testdata import write_photo_jpegs


def timed(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def single_process(run: Path, out: Path) -> None:
    durable.write_parquet(out, ledger.build_ledger(run))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--partition-size", type=int, default=1000)
    args = ap.parse_args()
    runner.init_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory(prefix="lvd-ledger-bench-") as tmp:
        root = Path(tmp)
        write_photo_jpegs(root / "dump", args.n, side=args.side)
        run = root / "run"
        parts = stages.plan([str(root / "dump")], args.partition_size)
        t_ingest = timed(stages.run_ingest, parts, run, IngestConfig())
        t_dedup = timed(stages.run_dedup, run, DedupConfig())
        t_ledger = timed(ledger.write_parts, run)
        t_verify = timed(ledger.verify_run, run)
        t_single = timed(single_process, run, root / "single.parquet")
        report = ledger.verify_run(run)
        assert report.ok and report.inputs == args.n, report.problems
        assert ledger.read_ledger(run).equals(ledger.build_ledger(run))  # same rows as the reference
    print(f"{args.n} inputs ({args.side} px JPEG), {len(parts)} partitions, {args.cpus} CPUs")
    print(f"{'stage':<34}{'seconds':>9}{'ms/input':>10}{'x ingest':>10}")
    for name, t in (
        ("ingest (baseline)", t_ingest),
        ("hash dedup", t_dedup),
        ("ledger: partitioned write (Ray)", t_ledger),
        ("verify (Ray; no shards)", t_verify),
        ("ledger: single process (before)", t_single),
    ):
        print(f"{name:<34}{t:>9.2f}{1000 * t / args.n:>10.3f}{t / t_ingest:>10.3f}")
    verdict = "meets" if t_ledger <= t_ingest / 5 else "misses"
    print(f"ledger / ingest = {t_ledger / t_ingest:.3f} ({verdict} the target of at most 0.2; baseline: ingest)")


if __name__ == "__main__":
    main()
