"""Processes: `lvd curate` killed with SIGKILL leaves nothing running, and the next run marks
the flow run it left RUNNING as Crashed.

Real everything: the `lvd` command line in a subprocess with its own local Ray and Prefect's
temporary server (a private PREFECT_HOME and HOME), SIGKILL, /proc to see what survives, and
Prefect's client to read the flow runs' states.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvd.curation import testdata
from lvd.flows import watchdog

from .procs import cmdline, kill_all, tree

ROOT = Path(__file__).resolve().parents[2]


def env_for(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(
        HOME=str(tmp / "home"),
        PREFECT_HOME=str(tmp / "prefect"),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


STATES = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    print("RUNS " + json.dumps([[str(r.id), r.flow_id and str(r.flow_id), r.state_type.value, r.start_time.isoformat() if r.start_time else None] for r in c.read_flow_runs()]))
"""


@pytest.mark.slow
def test_sigkill_leaves_no_process_and_next_run_marks_it_crashed(tmp_path):
    dump = tmp_path / "dump"
    testdata.write_photo_jpegs(dump, 120, side=128)
    out = tmp_path / "run"
    env = env_for(tmp_path)
    argv = [sys.executable, "-m", "lvd.cli", "curate", "--input", str(dump), "--out", str(out), "--partition-size", "4"]
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if list((out / "ingest").glob("part-*.done.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        started = {p: watchdog.start_time(p) for p in tree(proc.pid) if p != proc.pid}
        names = {p: cmdline(p) for p in started}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        assert any("raylet" in c for c in names.values()), names  # lvd's own local Ray
        assert any("prefect" in c or "uvicorn" in c for c in names.values()), names  # temporary server
        while time.monotonic() - killed_at < 30 and any(watchdog.is_alive(p, s) for p, s in started.items()):
            time.sleep(0.2)
        survivors = {p: names[p] for p, s in started.items() if watchdog.is_alive(p, s)}
        print(f"all {len(started)} processes gone {time.monotonic() - killed_at:.1f} s after the SIGKILL")
        assert not survivors, f"still running 30 s after lvd was killed: {survivors}"
    finally:
        kill_all([p for p, s in started.items() if watchdog.is_alive(p, s)])

    again = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    states = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=300)
    (line,) = [ln for ln in states.stdout.splitlines() if ln.startswith("RUNS ")]
    runs = sorted(json.loads(line[5:]), key=lambda r: r[3] or "")
    assert [r[2] for r in runs] == ["CRASHED", "COMPLETED"], runs
    said = again.stdout + again.stderr
    assert f"({runs[0][0]}) of {out} Crashed" in said  # the user is told which run and why
    # no telemetry attempt from the temporary server (PREFECT_SERVER_ANALYTICS_ENABLED=false)
    assert not [
        ln for ln in said.splitlines() if "ERROR" in ln and ("analytics" in ln.lower() or "telemetry" in ln.lower())
    ]
    assert not list((tmp_path / "prefect" / "lvd-processes").glob("*.json"))  # both records gone
