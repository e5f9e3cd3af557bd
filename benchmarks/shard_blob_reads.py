"""What a shard task reads of the ingest blob files, as a ratio against the layout before.

    .venv/bin/python benchmarks/shard_blob_reads.py [--images 20000] [--parts 20] [--kb 30] [--shard 1000]

The shard stage cuts the shipped images into shards in uid order; a shard task asks
`rundir.read_blobs` for its uids (a contiguous uid range) in every blob file of the run.
- baseline "one group, input order (before)": each part's blobs in input order, one row group
  (Parquet's default): Arrow cannot skip anything, so every shard task read every image of
  the pool (shards x pool bytes for the stage);
- "sorted, ~1 MiB groups": what ingest writes now (`ingest.blob_table`, `rundir.blob_group_rows`).

The pool: --images random byte strings of --kb KiB (the read does not decode) under fake
uids, in --parts ingest parts written by `runner.write_outputs` as ingest writes them. Ten
shards spread over the uid order are read with each layout, interleaved; the median is kept.
Printed: ms per shard, the bytes of the row groups each read (from the files' uid
statistics: `rundir.groups_holding`), and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd import durable
from lvd.curation import rundir, runner
from lvd.curation.ingest import BLOB_SCHEMA, blob_table


class _Part:
    def __init__(self, index: int):
        self.index, self.fingerprint = index, f"bench-{index}"


def write_pool(root: Path, layout: str, uids: list[str], data: list[bytes], parts: int) -> Path:
    run = root / layout
    ingest = rundir.stage_dir(run, "ingest")
    ingest.mkdir(parents=True)
    for p, rows in enumerate(np.array_split(np.arange(len(uids)), parts)):
        blobs = {uids[i]: data[i] for i in rows.tolist()}
        records = pa.table({"uid": [uids[i] for i in rows.tolist()]})
        marker = runner.write_outputs({"": records, rundir.BLOBS: blob_table(blobs)}, _Part(p), ingest, "bench")
        if layout == "before":  # input order, one row group: what ingest wrote before
            path = ingest / marker["outputs"][rundir.BLOBS]
            durable.write_parquet(
                path, pa.table({"uid": list(blobs), "data": list(blobs.values())}, schema=BLOB_SCHEMA)
            )
    return run


def group_bytes(run: Path, want: list[str]) -> int:
    """Bytes of the row groups `rundir.read_blobs` reads for `want` (`rundir.groups_holding`)."""
    total = 0
    for path in rundir.ingest_blob_files(run).values():
        md = pq.ParquetFile(path).metadata
        total += sum(md.row_group(g).total_byte_size for g in rundir.groups_holding(md, sorted(want)))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--kb", type=int, default=30)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--shards-read", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    uids = [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(args.images)]
    data = [rng.bytes(args.kb * 1024) for _ in range(args.images)]
    order = sorted(uids)
    n_shards = -(-len(order) // args.shard)
    picks = np.linspace(0, n_shards - 1, min(args.shards_read, n_shards)).round().astype(int).tolist()
    with tempfile.TemporaryDirectory(prefix="lvd-shard-reads-") as tmp:
        runs = {layout: write_pool(Path(tmp), layout, uids, data, args.parts) for layout in ("before", "after")}
        pool_mb = sum(p.stat().st_size for p in rundir.ingest_blob_files(runs["after"]).values()) / 2**20
        times = {layout: [] for layout in runs}
        read = {layout: [] for layout in runs}
        for s in picks:
            want = order[s * args.shard : (s + 1) * args.shard]
            for layout, run in runs.items():
                t0 = time.perf_counter()
                got = rundir.read_blobs(run, want)
                times[layout].append(time.perf_counter() - t0)
                assert len(got) == len(want) and all(got[u] == data[uids.index(u)] for u in want[:3])
                read[layout].append(group_bytes(run, want))
        groups = pq.ParquetFile(next(iter(rundir.ingest_blob_files(runs["after"]).values()))).num_row_groups
    print(
        f"pool: {args.images} images of {args.kb} KiB in {args.parts} parts ({pool_mb:.0f} MiB), "
        f"shards of {args.shard} ({n_shards}), {len(picks)} read; after: {groups} row groups a part"
    )
    print("| layout | ms per shard (median) | MiB of row groups read per shard | the stage's reads, GiB |")
    print("|---|---:|---:|---:|")
    for layout, name in (("before", "one group, input order (before; baseline)"), ("after", "sorted, ~1 MiB groups")):
        mib = statistics.median(read[layout]) / 2**20
        print(f"| {name} | {statistics.median(times[layout]) * 1e3:.1f} | {mib:.1f} | {mib * n_shards / 1024:.2f} |")
    print(
        f"ratio (before / after): time {statistics.median(times['before']) / statistics.median(times['after']):.1f}x, "
        f"bytes {statistics.median(read['before']) / statistics.median(read['after']):.1f}x"
    )


if __name__ == "__main__":
    main()
