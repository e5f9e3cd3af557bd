"""Partitioned hash dedup (lvd.curation.scale.hashdedup) against the single process, and
against an older hashdedup from another checkout.

Baselines:
- `dedup.find_near_duplicates` on the whole table, in this process (the single process);
- with --baseline-tree DIR: the partitioned dedup of the checkout DIR (e.g. `git worktree add
  /tmp/base <commit>`), run back to back in a subprocess with PYTHONPATH=DIR on the same parts
  and the same Ray sizes (its own local Ray, 2 CPUs). Ratios are wall-time ratios, both runs on
  the same machine one after the other.

The partitioned runs use a local Ray with 2 CPUs, --blocks blocks, 4 exact buckets and 4 node
partitions, and must give the single process's table (printed as equal=True). The pool is the
test's synthetic pool (random hash records plus one planted case per channel), 4 Parquet parts.

Above --single-max records the single process is skipped (10^6 takes it tens of minutes here):
the baseline tree's table is then compared with this checkout's (printed as equal_to_this=...).

Run: .venv/bin/python benchmarks/partitioned_dedup.py [SIZES...] [--baseline-tree DIR]   (default 5000 20000)
     .venv/bin/python benchmarks/partitioned_dedup.py 1000000 --single-max 1e5 --baseline-tree DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "curation"))
from test_scale_hashdedup import synthetic_pool, write_parts  # noqa: E402

from lvd.curation.dedup import DedupConfig, find_near_duplicates  # noqa: E402
from lvd.curation.runner import init_ray  # noqa: E402
from lvd.curation.scale.hashdedup import ShuffleConfig, folder_sources, partitioned_duplicates  # noqa: E402

# the older checkout's run: same call, its own Ray; prints seconds and whether it equals want
_OTHER = """
import json, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from lvd.curation.dedup import DedupConfig
from lvd.curation.runner import init_ray
from lvd.curation.scale import hashdedup as H
init_ray(num_cpus=2)
tmp, buckets = Path(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter()
rep = H.partitioned_duplicates(H.folder_sources(tmp / "parts"), DedupConfig(), tmp / "other",
                               H.ShuffleConfig(buckets=buckets, exact_buckets=4, partitions=4))
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"wall": wall, "equal": pq.read_table(rep.duplicates).equals(
    pq.read_table(tmp / "want.parquet")), "module": H.__file__}))
"""


def run_other(tree: Path, tmp: Path, buckets: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)
    try:
        res = subprocess.run(
            [sys.executable, "-c", _OTHER, str(tmp), str(buckets)],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=tree,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"wall": float("inf"), "equal": None, "module": f"{tree} (stopped after {timeout:.0f} s)"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"baseline tree run failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", type=int, default=[5000, 20000])
    p.add_argument("--blocks", type=int, default=4, help="ShuffleConfig.buckets of both partitioned runs")
    p.add_argument("--baseline-tree", type=Path, help="a checkout whose partitioned dedup is run back to back")
    p.add_argument("--baseline-timeout", type=float, default=3600, help="stop the baseline tree's run after this")
    p.add_argument("--single-max", type=float, default=float("inf"), help="skip the single process above this size")
    args = p.parse_args(argv)
    init_ray(num_cpus=2)
    for n in args.sizes:
        table, _ = synthetic_pool(n, seed=5)
        tmp = Path(tempfile.mkdtemp())
        write_parts(table, tmp / "parts", 4)
        single = n <= args.single_max
        t0, c0 = time.perf_counter(), time.process_time()
        want = find_near_duplicates(table, DedupConfig()) if single else None
        t1, c1 = time.perf_counter(), time.process_time()
        del table
        shuffle = ShuffleConfig(buckets=args.blocks, exact_buckets=4, partitions=4)
        t1 = time.perf_counter()
        rep = partitioned_duplicates(folder_sources(tmp / "parts"), DedupConfig(), tmp / "work", shuffle)
        t2 = time.perf_counter()
        got = pq.read_table(rep.duplicates)
        pq.write_table(want if single else got, tmp / "want.parquet")
        versus = (
            f"single process (dedup.find_near_duplicates) {t1 - t0:.1f} s wall ({c1 - c0:.1f} s CPU) | "
            f"partitioned {t2 - t1:.1f} s wall = {(t2 - t1) / (t1 - t0):.2f}x the single process | "
            f"equal={got.equals(want)}"
            if single
            else f"single process skipped (> --single-max) | partitioned {t2 - t1:.1f} s wall"
        )
        print(
            f"n={n} {versus} duplicates={got.num_rows} blocks={rep.blocks} candidates={rep.candidates} "
            f"edges={rep.edges} star steps={rep.phases}",
            flush=True,
        )
        if args.baseline_tree:
            other = run_other(args.baseline_tree, tmp, args.blocks, args.baseline_timeout)
            print(
                f"n={n} baseline: partitioned dedup of {other['module']}: {other['wall']:.1f} s wall, "
                f"{'equal' if single else 'equal_to_this'}={other['equal']} | this checkout {t2 - t1:.1f} s: "
                f"{other['wall'] / (t2 - t1):.1f}x faster",
                flush=True,
            )


if __name__ == "__main__":
    main()
