"""The partitioned global stages under a memory budget and on a multi-node cluster.

- The budget's partition sizes (lvd.curation.scale.budget) against hand-computed values.
- A pool whose vectors are larger than one worker's budget runs to the end, and the peak RSS of
  the driver and of every Ray worker (VmHWM, budget.PeakWatch) stays under the budget: the
  benchmark's own harness (benchmarks/curate_scale.py --one) in a fresh process with its own Ray.
- On a `ray.cluster_utils.Cluster` (head without CPUs + 3 nodes), a worker node removed in the
  middle of each partitioned stage (hash dedup + components, distributed k-means, sharded kNN,
  the ledger) changes no output: the same bytes as the run without a fault (tests/curation/
  _scale_work.py, in a subprocess since the session's Ray is this process's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _scale_work import STAGES, assert_same_outputs

from lvd.curation.scale import budget as B
from lvd.curation.scale.synthetic import PoolSpec, expected_duplicates, write_pool

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(__file__).with_name("_scale_work.py")


def run_script(argv: list[str], timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- the budget's arithmetic


def test_parse_bytes_units_and_refusals():
    assert B.parse_bytes("4GiB") == 4 << 30
    assert B.parse_bytes("512 MiB") == 512 << 20
    assert B.parse_bytes("1.5G") == 1_500_000_000
    assert B.parse_bytes("2e9") == 2_000_000_000
    assert B.parse_bytes("100") == 100
    for bad in ("4 parsecs", "", "GiB", "-1GiB"):
        with pytest.raises(ValueError, match="memory size"):
            B.parse_bytes(bad)
    with pytest.raises(ValueError, match="at least 512 MiB"):
        B.WorkerBudget(B.parse_bytes("300MiB"))


def test_hash_record_bytes_count_every_fixed_width_code_column_ingest_writes():
    """The budget's hash record holds the ingest schema's code columns at their widths (it said
    4 clipped codes while ingest wrote 7, and the exact pass's buckets overran a 3 GiB worker at 10^7)."""
    from lvd.curation.ingest import INGEST_SCHEMA

    codes = ("phash256", "nphash256", "cphash256", "sat16", "thumb16")
    widths = sum(INGEST_SCHEMA.field(c).type.byte_width for c in codes)
    record = 68 + 4 * 8 + widths + 16  # uid, width, height, phash, dhash; the codes; key and row id
    assert record == B.HASH_RECORD_BYTES


def test_hash_shuffle_sizes_are_the_fewest_buckets_and_blocks_that_fit():
    b = B.WorkerBudget(3 << 30)
    assert B.hash_shuffle_sizes(10**7, b) == (32, 56)  # 10^7 under 3 GiB: 32 buckets, 56 blocks
    assert B.hash_shuffle_sizes(10**5, b, min_buckets=4) == (4, 1)
    per_bucket = 10**7 / 32 * B.EXACT_RECORD_BYTES
    per_block = 10**7 / 56 * B.PAIR_RECORD_BYTES
    assert per_bucket <= b.data_bytes and per_block <= b.data_bytes
    assert b.data_bytes < 10**7 / 31 * B.EXACT_RECORD_BYTES and b.data_bytes < 10**7 / 55 * B.PAIR_RECORD_BYTES


def test_partition_sizes_follow_the_budget():
    b = B.WorkerBudget(1 << 30)  # 1 GiB: (1024 - 256) MiB * 0.5 = 384 MiB of data
    assert b.data_bytes == 384 << 20
    # flat shard: fp16 row + float32 copy + id = 2*128 + 4*128 + 8 = 776 bytes
    assert B.vector_shard_rows(b, 128) == (384 << 20) // 776
    assert B.vector_shard_rows(b, 128, "ivf") == (384 << 20) // 784
    assert B.vector_shard_rows(b, 128, "ivfpq", pq_bytes=16) == (384 << 20) // 32
    assert B.shard_count(10**7, b, 128) == -(-(10**7) // ((384 << 20) // 776))
    # twice the budget holds (about) twice the rows: the partition grows with the budget, not with N
    assert B.vector_shard_rows(B.WorkerBudget(2 << 30), 128) > 2 * B.vector_shard_rows(b, 128)
    # exact-pass buckets: N records * an exact reduce's measured peak bytes per record over the data share
    assert B.hash_bucket_count(10**7, b) == -(-(10**7 * B.EXACT_RECORD_BYTES) // (384 << 20))
    assert B.hash_bucket_count(10**8, b) >= 10 * (B.hash_bucket_count(10**7, b) - 1)
    # k-means: centroids, sums (20kD) and one block's scratch come off first
    assert B.kmeans_shard_rows(b, 128, 1000) == ((384 << 20) - 20 * 1000 * 128) // (2 * 128 + 8)
    with pytest.raises(ValueError, match="raise --worker-memory"):
        B.kmeans_shard_rows(b, 1024, 100_000)
    assert B.query_block_rows(b, 1024, 64) == (384 << 20) // 4 // (4 * 1024 + 24 * 64)
    assert B.query_block_rows(b, 128, 16) == B.MAX_QUERY_BLOCK  # capped
    assert B.ray_options(b) == {"memory": 1 << 30}


def test_cluster_size_formula():
    b = B.WorkerBudget(16 << 30)
    size = B.cluster_size(10**9, 1024, b, node_memory=512 << 30, node_cores=64)
    per_row = 2 * 1024 + 4 * 1024 + 8
    assert size.vector_bytes == 10**9 * per_row
    assert size.workers == -(-size.vector_bytes // b.data_bytes)
    assert size.workers_per_node == min(64, int((512 << 30) * 0.9) // (16 << 30)) == 28
    assert size.nodes == -(-size.workers // 28)


# ---------------------------------------------------------------- a pool over the budget


@pytest.mark.slow
def test_vectors_larger_than_a_worker_budget_run_within_it(tmp_path):
    """600,000 x 512 float16 vectors (614 MB, 1.9 GB as the float32 a flat index holds) under a
    512 MiB budget per worker: sharded kNN, distributed k-means, the ledger, the shard plan, the
    partitioned cluster stage, partitioned balanced sampling and partitioned retrieval by a seed
    set (6,000 seeds, an IVF index) run to the end, and no process (driver or any Ray worker)
    peaks above 512 MiB."""
    budget = B.WorkerBudget(B.parse_bytes("512MiB"))
    spec = PoolSpec(n=600_000, dim=512, part_rows=10_000)
    pool = tmp_path / "pool-6e5-d512-p10000"
    write_pool(spec, pool)
    assert spec.n * spec.dim * 2 > budget.worker_bytes  # the pool's vectors alone exceed one worker's budget
    argv = [str(ROOT / "benchmarks" / "curate_scale.py"), "--one", str(spec.n), "2", "--pool-root", str(tmp_path)]
    argv += ["--worker-memory", "512MiB", "--dim", "512", "--part-rows", "10000", "--baseline-max", "0"]
    stages = ["sharded kNN", "k-means", "ledger", "shard plan", "cluster partitioned", "retrieve partitioned"]
    stages.append("retrieve seeds partitioned")
    rows = run_script([*argv, "--stages", ",".join(stages)], timeout=2400)
    assert [r["stage"] for r in rows] == stages
    for r in rows:
        assert r["wall_s"] is not None, r  # ran, not skipped
        assert 0 < r["driver_peak"] < budget.worker_bytes, r
        assert r["worker_peaks"] and max(r["worker_peaks"]) < budget.worker_bytes, r
    knn, km, led, plan, clu, ret, seeds = rows
    assert f"{spec.n} images clustered" in clu["note"] and f"{spec.n // 4} of {spec.n} images selected" in ret["note"]
    assert f"retrieved by {spec.n // 100} seeds" in seeds["note"], seeds["note"]
    assert f"{spec.n} rows in 3 uid ranges" in plan["note"], plan["note"]  # 291,000 records a range at 512 MiB
    assert len(knn["worker_peaks"]) >= spec.n * spec.dim * 4 // budget.worker_bytes  # really spread over shards
    assert "self found first 0.99" in knn["note"] or "self found first 1.0" in knn["note"], knn["note"]
    labels = pq.ParquetDataset(sorted((pool / "kmeans").glob("labels-*.parquet"))).read(columns=["row"])
    assert np.array_equal(np.sort(labels["row"].to_numpy()), np.arange(spec.n))  # every row clustered once
    assert f"{spec.n} rows" in led["note"], led["note"]


# ---------------------------------------------------------------- a node removed mid-stage


@pytest.mark.slow
def test_node_removed_during_each_partitioned_stage_changes_no_output(tmp_path):
    spec = PoolSpec(n=4_000, dim=32, part_rows=500, copy_every=20, centres=16)
    run = tmp_path / "run"
    write_pool(spec, run)
    out = tmp_path / "out"
    res = run_script([str(WORK), str(run), str(out), "--cluster-removal", "--budget", "600MiB"], timeout=1500)
    assert set(res["faulted"]) == set(STAGES)
    for stage, (start, end) in res["faulted"].items():
        assert stage in res["removed"] and start < res["removed"][stage] < end, f"{stage}: no node removed mid-stage"
    ref = out / "reference"
    assert_same_outputs(out, ref)
    # and the outputs are the right ones, not two equal empty tables
    dups = pq.read_table(out / "duplicates.parquet").to_pydict()
    linked = set(dups["uid"]) | set(dups["duplicate_of"])
    assert set(expected_duplicates(spec)) <= linked
    led = pq.read_table(out / "ledger.parquet")
    assert led.num_rows == spec.n
    assert led["status"].to_pylist().count("duplicate") == len(dups["uid"]) > 0
    assert pq.read_table(out / "labels.parquet").num_rows == spec.n
    # the partitioned cluster stage on 3 nodes: the single-process Lloyd's labels, every candidate once
    clusters = pq.read_table(out / "clusters.parquet")
    one = pq.read_table(out / "clusters.lloyd.parquet").sort_by("uid")
    assert clusters.select(["uid", "leaf"]).equals(one.select(["uid", "leaf"]))
    assert clusters.num_rows == spec.n - len(dups["uid"])
    # balanced sampling, partitioned on 3 nodes: the one-process draw, a quarter of the candidates
    sel = pq.read_table(out / "selection.parquet")["uid"].to_pylist()
    assert sel == pq.read_table(out / "selection.one.parquet")["uid"].to_pylist()
    seedsel = pq.read_table(out / "seedsel.parquet")  # retrieval with seeds, partitioned = its one task
    assert seedsel.num_rows == clusters.num_rows // 20 and seedsel.equals(
        pq.read_table(out / "seedsel.one.parquet").cast(seedsel.schema)
    )
    assert len(sel) == clusters.num_rows // 4
    assert (np.load(out / "knn_sims.npy")[:, 0] > 0.999).all()  # each query finds itself (or its copy) first
    planned = pq.read_table(out / "shardplan.parquet")["uid"].to_pylist()  # the candidates, in uid order
    assert planned == sorted(set(led["uid"].to_pylist()) - set(dups["uid"])) and len(planned) < spec.n
