"""A SIGKILLed driver in the middle of partitioned copy detection and partitioned
decontamination, then a rerun: the same output files, byte for byte, as a run never interrupted.

The driver is tests/curation/_copy_scale_work.py in a subprocess joined to the session's Ray
(as `lvd curate --ray-address` would be). The run folders are the ones tests/curation/
test_scale_copy.py and test_decontam_scale.py build from real photos, with small parts so each
stage runs several waves of Ray tasks. The kill lands once the stage's first wave has written
scratch outputs and before the stage's output exists; the rerun then starts the stage over
(it clears the scratch) and must write what the uninterrupted run wrote. On a 3-node
`ray.cluster_utils.Cluster` (in the driver), a worker node running one of the stage's tasks is
removed mid-stage: the tasks are retried elsewhere and the outputs are the same.
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

WORK = Path(__file__).with_name("_copy_scale_work.py")
sys.path.insert(0, str(WORK.parent))

import _copy_scale_work as W  # noqa: E402


@pytest.fixture(scope="module")
def copy_run(ray_local, tmp_path_factory) -> Path:
    """test_scale_copy's 33-image pool after ingest, dedup and copy features; the proposer
    folder inside it (RUN/proposer), where the driver looks."""
    from test_scale_copy import make_run

    run, prop = make_run(tmp_path_factory.mktemp("copyfault"))
    shutil.copytree(prop, run / "proposer")
    return run


@pytest.fixture(scope="module")
def decontam_run(ray_local, tmp_path_factory) -> Path:
    """test_decontam_scale's pool and eval sets (copy detection done, given vectors)."""
    from test_decontam_scale import runs

    return runs.__wrapped__(ray_local, tmp_path_factory)[0]


def driver(stage: str, run: Path, out: Path, address: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, str(WORK), stage, str(run), str(out), "--address", address]
    return subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> dict:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def kill_mid_stage(proc: subprocess.Popen, stage: str, run: Path, log: Path, waves: int = 2) -> int:
    """SIGKILL the driver once `waves` scratch files of the stage exist; -> scratch files then.
    The stage's output must not exist yet: the kill landed in the middle."""
    scratch, deadline = run / W.SCRATCH[stage], time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if scratch.exists() and len([p for p in scratch.rglob("*") if p.is_file()]) >= waves:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"driver ended before the kill: {log.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / W.OUTPUT[stage]).exists(), f"{stage} wrote its output before the kill landed"
    return len([p for p in scratch.rglob("*") if p.is_file()])


def outputs(run: Path, stage: str) -> dict[str, bytes | dict]:
    """The stage's Parquet outputs as bytes; a *.stats.parquet (one JSON row with the stage's
    timings, seconds_*) as its JSON without the timings."""
    folder = (run / W.OUTPUT[stage]).parent
    got: dict[str, bytes | dict] = {}
    for p in sorted(folder.glob("*.parquet")):
        if p.name.endswith(".stats.parquet"):
            row = json.loads(pq.read_table(p)["json"][0].as_py())
            got[p.name] = {k: v for k, v in row.items() if not k.startswith("seconds_")}
        else:
            got[p.name] = p.read_bytes()
    return got


def check_kill_and_rerun(stage: str, pool: Path, ray_local, tmp_path: Path) -> None:
    # the session's Ray listens on loopback only (runner.init_ray); its gcs_address names the LAN IP
    address = "127.0.0.1:" + ray_local.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    ref_run, run, log = tmp_path / "ref-run", tmp_path / "run", tmp_path / "driver.log"
    for d in (ref_run, run):
        shutil.copytree(pool, d)
        shutil.rmtree(d / stage, ignore_errors=True)  # the stage itself has not run
    finish(driver(stage, ref_run, tmp_path / "ref", address, log), log)
    want = outputs(ref_run, stage)
    assert pq.read_metadata(ref_run / W.OUTPUT[stage]).num_rows > 0  # copies found: the equality means something
    assert not (ref_run / W.SCRATCH[stage]).exists()
    left = kill_mid_stage(driver(stage, run, tmp_path / "out", address, log), stage, run, log)
    assert left >= 2 and not (tmp_path / "out" / f"{stage}.done").exists()
    print(f"{stage}: killed with {left} scratch files written")
    time.sleep(2.0)  # let Ray reap the dead driver's tasks
    finish(driver(stage, run, tmp_path / "out", address, log), log)
    got = outputs(run, stage)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{stage}: {name} differs after the kill and rerun"
    assert not (run / W.SCRATCH[stage]).exists()  # the rerun cleared the dead run's scratch


@pytest.mark.slow
def test_sigkill_in_partitioned_copy_detection_then_rerun_gives_identical_outputs(ray_local, copy_run, tmp_path):
    check_kill_and_rerun("copydetect", copy_run, ray_local, tmp_path)


@pytest.mark.slow
def test_sigkill_in_partitioned_decontamination_then_rerun_gives_identical_outputs(ray_local, decontam_run, tmp_path):
    check_kill_and_rerun("decontam", decontam_run, ray_local, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["copydetect", "decontam"])
def test_worker_node_removed_mid_stage_gives_identical_outputs(stage, copy_run, decontam_run, tmp_path):
    """A 3-node Cluster (in the driver subprocess; the session's Ray is another) loses a worker
    node while the stage's waves run: its tasks are retried elsewhere, the outputs unchanged."""
    run, log = tmp_path / "run", tmp_path / "driver.log"
    shutil.copytree(copy_run if stage == "copydetect" else decontam_run, run)
    shutil.rmtree(run / stage, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, str(WORK), stage, str(run), str(tmp_path / "out"), "--cluster-removal"]
    proc = subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    res = finish(proc, log)
    assert res["removed"] and res["killed_tasks"], res  # the node went mid-stage, with tasks running on it
    print(f"{stage}: node removed running {res['killed_tasks']} (attempt {res['attempts']})")
    want, got = outputs(tmp_path / "out" / "reference", stage), outputs(run, stage)
    assert sorted(got) == sorted(want) and pq.read_metadata(run / W.OUTPUT[stage]).num_rows > 0
    for name in want:
        assert got[name] == want[name], f"{stage}: {name} differs after the node removal"
