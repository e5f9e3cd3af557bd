"""A SIGKILLed driver in the middle of each partitioned global stage, then a rerun: the same
outputs as a run that was never interrupted.

The driver is tests/curation/_scale_work.py in a subprocess joined to the session's Ray (as
`lvd curate --ray-address` would be): hash dedup + components, distributed k-means, the sharded
kNN and the partitioned ledger, in order, on a synthetic run folder. The test kills it with
SIGKILL while stage 1 runs, starts it again (finished stages are skipped, as the flow skips
done stages) and kills that one while stage 2 runs, and so on; the last start runs to the end.
Every output (duplicate groups, centroids and labels, neighbour ids and similarities, the
ledger) must then equal the uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _scale_work import STAGES, assert_same_outputs

from lvd.curation.scale.synthetic import PoolSpec, expected_duplicates, write_pool

WORK = Path(__file__).with_name("_scale_work.py")
SPEC = PoolSpec(n=4_000, dim=32, part_rows=500, copy_every=20, centres=16)


def driver(run: Path, out: Path, address: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, str(WORK), str(run), str(out), "--address", address, "--resume"]
    return subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> dict:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def kill_during(proc: subprocess.Popen, out: Path, stage: str, delay: float, log: Path) -> None:
    """SIGKILL the driver `delay` s after `stage` started, if it has not finished by then."""
    deadline = time.monotonic() + 900
    while not (out / f"{stage}.started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, f"driver ended before the kill: {log.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / f"{stage}.done").exists(), f"{stage} finished before the kill landed (delay {delay:.2f} s)"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-pool")
    return write_pool(SPEC, root / "run")


@pytest.mark.slow
def test_sigkill_in_each_partitioned_stage_then_rerun_gives_identical_outputs(ray_local, pool, tmp_path):
    # the session's Ray listens on loopback only (runner.init_ray); its gcs_address names the LAN IP
    address = "127.0.0.1:" + ray_local.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    ref_run, run = tmp_path / "ref-run", tmp_path / "run"
    shutil.copytree(pool, ref_run)
    shutil.copytree(pool, run)
    ref_out, out, log = tmp_path / "ref", tmp_path / "out", tmp_path / "driver.log"
    walls = {s: end - start for s, (start, end) in finish(driver(ref_run, ref_out, address, log), log).items()}
    for stage in STAGES:  # each start is killed in the next stage that has not finished
        kill_during(driver(run, out, address, log), out, stage, 0.4 * walls[stage], log)
        time.sleep(2.0)  # let Ray reap the dead driver's tasks and actors
        for done in STAGES[: STAGES.index(stage)]:
            assert (out / f"{done}.done").exists()
    finish(driver(run, out, address, log), log)
    assert_same_outputs(out, ref_out)
    # the reference itself is right: every planted copy grouped, every row in the ledger once,
    # every uid that is not a duplicate planned once, in uid order
    dups = pq.read_table(ref_out / "duplicates.parquet").to_pydict()
    planned = pq.read_table(ref_out / "shardplan.parquet")["uid"].to_pylist()
    assert planned == sorted(set(pq.read_table(ref_out / "ledger.parquet")["uid"].to_pylist()) - set(dups["uid"]))
    assert set(expected_duplicates(SPEC)) <= set(dups["uid"]) | set(dups["duplicate_of"])
    clusters = pq.read_table(ref_out / "clusters.parquet")  # the partitioned stage = one-process Lloyd
    one = pq.read_table(ref_out / "clusters.lloyd.parquet").sort_by("uid")
    assert clusters.select(["uid", "leaf"]).equals(one.select(["uid", "leaf"])) and clusters.num_rows == len(planned)
    sel = pq.read_table(ref_out / "selection.parquet")["uid"].to_pylist()  # partitioned = one-process draw
    assert sel == pq.read_table(ref_out / "selection.one.parquet")["uid"].to_pylist() and len(sel) == len(planned) // 4
    seedsel = pq.read_table(ref_out / "seedsel.parquet")  # retrieval with seeds, partitioned = its one task
    assert seedsel.num_rows == len(planned) // 20  # the cap: more were found
    assert seedsel.equals(pq.read_table(ref_out / "seedsel.one.parquet").cast(seedsel.schema))
    led = pq.read_table(ref_out / "ledger.parquet")
    assert sorted(led["source"].to_pylist()) == [f"synthetic/{i:09d}.jpg" for i in range(SPEC.n)]
    assert led["status"].to_pylist().count("duplicate") == len(dups["uid"]) > 0
