"""Partitioned hash dedup (lvd.curation.scale.hashdedup) against the single process.

Baseline, same process: `dedup.find_near_duplicates` on the whole table. The partitioned run
uses the local Ray this script starts (2 CPUs), 8 buckets, 4 exact buckets, 4 node partitions,
and must give the same table (printed as equal=True). The pool is the test's synthetic pool
(random hash records plus one planted case per channel), written as 4 Parquet parts.

Run: .venv/bin/python benchmarks/partitioned_dedup.py [SIZES...]   (default 5000 20000)
"""

from __future__ import annotations

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


def main(sizes: list[int]) -> None:
    init_ray(num_cpus=2)
    for n in sizes:
        table, _ = synthetic_pool(n, seed=5)
        tmp = Path(tempfile.mkdtemp())
        write_parts(table, tmp / "parts", 4)
        t0, c0 = time.perf_counter(), time.process_time()
        want = find_near_duplicates(table, DedupConfig())
        t1, c1 = time.perf_counter(), time.process_time()
        shuffle = ShuffleConfig(buckets=8, exact_buckets=4, partitions=4)
        rep = partitioned_duplicates(folder_sources(tmp / "parts"), DedupConfig(), tmp / "work", shuffle)
        t2 = time.perf_counter()
        equal = pq.read_table(rep.duplicates).equals(want)
        print(
            f"n={n} baseline single process {t1 - t0:.1f} s wall ({c1 - c0:.1f} s CPU) | partitioned "
            f"{t2 - t1:.1f} s wall = {(t2 - t1) / (t1 - t0):.1f}x baseline | equal={equal} duplicates={want.num_rows} "
            f"keys={rep.copies} edges={rep.edges} star steps={rep.phases}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [5000, 20000])
