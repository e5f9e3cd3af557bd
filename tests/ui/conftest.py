"""A real `prefect server start` on 127.0.0.1 and one small `lvd pipeline` run against it.

Neither uses the session's `prefect_harness`: the server is a subprocess with its own
PREFECT_HOME (its PID written to a file, stopped with SIGTERM then SIGKILL at teardown), and
the pipeline runs in another subprocess with PREFECT_API_URL pointing at it, as a user would.
Server and pipeline logs go next to the screenshots, so a failed CI run can be read back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
SHOTS = ARTIFACTS / "screenshots"  # CI keeps artifacts/ (gitignored)
LOGS = ARTIFACTS / "prefect-ui"
SERVER_START_TIMEOUT_S = 180  # migrating a new SQLite database is slow on a busy 2-core machine
PIPELINE_TIMEOUT_S = 600
_taken: list[Path] = []  # screenshots, listed in the terminal summary


@dataclass(frozen=True, kw_only=True)
class PrefectServer:
    url: str  # http://127.0.0.1:PORT (the UI); the API is url + "/api"
    home: Path
    pid: int


@dataclass(frozen=True, kw_only=True)
class PipelineRun:
    """The finished `pipeline` flow run, its subflow runs by flow name, and its inputs."""

    server: PrefectServer
    flow_run_id: str
    flow_run_name: str
    children: dict[str, dict]  # flow name -> flow run (API JSON)
    out: Path
    expected_rejections: dict[str, int]  # reason -> inputs the demo dump makes bad on purpose


@pytest.fixture(scope="package")
def screenshot():
    """screenshot(page, name): a full-page PNG under artifacts/screenshots/, listed at the end
    of the test run. Old PNGs there are removed first, so the folder shows this run only."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()

    def take(page, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        _taken.append(path)
        return path

    return take


def pytest_terminal_summary(terminalreporter):
    if _taken:
        terminalreporter.write_sep("-", "Prefect UI screenshots")
        for path in _taken:
            terminalreporter.write_line(str(path.relative_to(REPO)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/api/health", timeout=5).json() is True:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its services), SIGKILL after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # our own group: the server was started in a new session
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-ui-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI asks the API at these host and port; `--port` alone leaves it on 4200.
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_API_URL", None)
    LOGS.mkdir(parents=True, exist_ok=True)
    log, pid_file = LOGS / "server.log", LOGS / "server.pid"
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(prefect),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-scheduler",
                "--no-late-runs",
                "--analytics-off",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    try:
        _wait_healthy(proc, url, log)
        yield PrefectServer(url=url, home=home, pid=proc.pid)
    finally:
        _stop(proc)
        pid_file.unlink(missing_ok=True)


def _post(server: PrefectServer, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{server.url}/api/{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="package")
def pipeline_run(prefect_server, tmp_path_factory) -> PipelineRun:
    """`lvd pipeline` on the demo dump (2 photos and their copies), tiny recipe, 2 steps."""
    from collections import Counter

    from lvd.curation.demo import build_demo_dump, build_knn_folders

    root = tmp_path_factory.mktemp("ui-pipeline")
    dump = build_demo_dump(root / "dump", n_photos=2)
    train, val = build_knn_folders(root / "knn", per_class_train=3, per_class_val=2)
    out = root / "out"
    argv = [
        sys.executable,
        "-m",
        "lvd.cli",
        "pipeline",
        *[a for i in dump.inputs for a in ("--input", i)],
        "--out",
        str(out),
        "--recipe",
        "tiny",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--knn-train",
        str(train),
        "--knn-val",
        str(val),
        "--knn-k",
        "3",
        "--partition-size",
        "16",
    ]
    env = {**os.environ, "PREFECT_API_URL": f"{prefect_server.url}/api", "PREFECT_HOME": str(prefect_server.home)}
    log = LOGS / "pipeline.log"
    with open(log, "w") as f:
        rc = subprocess.run(
            argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=PIPELINE_TIMEOUT_S, cwd=root
        ).returncode
    assert rc == 0, f"lvd pipeline exited with {rc}:\n{_tail(log)}"
    runs = _post(prefect_server, "flow_runs/filter", {"flows": {"name": {"any_": ["pipeline"]}}})
    assert len(runs) == 1, runs
    children = _post(
        prefect_server, "flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [runs[0]["id"]]}}}
    )
    flows = {f["id"]: f["name"] for f in _post(prefect_server, "flows/filter", {})}
    return PipelineRun(
        server=prefect_server,
        flow_run_id=runs[0]["id"],
        flow_run_name=runs[0]["name"],
        children={flows[c["flow_id"]]: c for c in children},
        out=out,
        expected_rejections=dict(Counter(dump.rejections.values())),
    )
