"""`rundir.unique_accepted` (one row per accepted uid, its first input by source order) for the
copy stages' drivers, against the code before, each in a fresh subprocess (peak RSS is per
process), back to back on one pool.

    .venv/bin/python benchmarks/unique_accepted.py [--pool DIR]   (default: a 10^6 synthetic pool, written once)

- baseline "before": every non-NOT_FOR_DEDUP ingest column read, the first of each uid found
  with a Python set over a list of every uid, then uid, width and height selected (what
  `scale.copyscale` and `stages.copy.read_features` did);
- "now": `rundir.unique_accepted(run, ["uid", "width", "height"])` (Arrow sorts, three columns).
Printed: rows, seconds and peak RSS of each, and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation import rundir
from lvd.curation.scale.synthetic import PoolSpec, write_pool


def before(run: Path) -> pa.Table:
    names = pq.read_schema(rundir.ingest_manifests(run)[0]).names
    t = rundir.read_ingest(run, [c for c in names if c not in rundir.NOT_FOR_DEDUP])
    t = t.filter(pc.equal(t["status"], "accepted")).sort_by([("source", "ascending")])
    seen: set[str] = set()
    keep = [not (u in seen or seen.add(u)) for u in t["uid"].to_pylist()]
    return t.filter(pa.array(keep, pa.bool_())).select(["uid", "width", "height"])


def one(which: str, run: Path) -> None:
    t0 = time.perf_counter()
    t = before(run) if which == "before" else rundir.unique_accepted(run, ["uid", "width", "height"])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "rows": t.num_rows,
                "wall": wall,
                "peak": peak,
                "digest": hashlib.sha256("".join(t["uid"].to_pylist()).encode()).hexdigest(),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=Path, default=None)
    p.add_argument("--one", nargs=2, metavar=("WHICH", "RUN"))
    args = p.parse_args()
    if args.one:
        one(args.one[0], Path(args.one[1]))
        return
    run = args.pool or write_pool(PoolSpec(n=1_000_000), Path("/tmp/lvd-unique-accepted-1e6"), vectors_too=False)
    got = {}
    for which in ("before", "now"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", which, str(run)], capture_output=True, text=True, check=True
        )
        got[which] = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    b, n = got["before"], got["now"]
    assert b["rows"] == n["rows"] and b["digest"] == n["digest"]
    for name, r in (("before (baseline: all columns, a Python set)", b), ("now (Arrow, three columns)", n)):
        print(f"{name}: {r['rows']} rows, {r['wall']:.1f} s, peak {r['peak'] / 2**20:,.0f} MiB")
    print(f"ratio before / now: time {b['wall'] / n['wall']:.1f}x, peak {b['peak'] / n['peak']:.1f}x")


if __name__ == "__main__":
    main()
