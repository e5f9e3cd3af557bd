"""The network: what a local Ray listens on, joining a token-protected cluster, telemetry.

Real processes only: `runner.init_ray` in a fresh Python (the session's Ray is already up in
this one), a `ray start --head` cluster with token authentication in a temporary HOME, and
Prefect's own settings. Nothing leaves 127.0.0.1: the cluster is started loopback-only too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from .procs import LOOPBACK, free_port, kill_all, pids_matching

RAY = str(Path(sys.executable).parent / "ray")


def clean_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


LOCAL = """
import json, os, ray
from lvd.curation import runner
from tests.security.procs import listening, tree
runner.init_ray(num_cpus=1)
assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
print("LISTEN " + json.dumps(listening(tree(os.getpid()))))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", LOCAL],
        env=clean_env(tmp_path, PYTHONPATH=str(root)),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("LISTEN ")]
    socks = json.loads(line[len("LISTEN ") :])
    names = " ".join(cmd for _, cmd, _, _ in socks)
    assert "gcs_server" in names and "raylet" in names, socks  # the servers were found
    wide = [s for s in socks if s[2] not in LOOPBACK]
    assert not wide, f"Ray listens beyond loopback: {wide}"
    assert not [s for s in socks if s[3] == 8265], "the dashboard was started without being asked for"


@pytest.fixture
def token_cluster():
    """A `ray start --head` cluster with token auth (RAY_AUTH_MODE=token, token in HOME)."""
    home = Path(tempfile.mkdtemp(prefix="lvd-ray-home-"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex * 2)
    temp = tempfile.mkdtemp(prefix="lvdray", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    # Loopback-only, the same switch lvd's local Ray uses: nothing listens beyond 127.0.0.1.
    env = clean_env(home, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [
        RAY,
        "start",
        "--head",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--temp-dir",
        temp,
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        yield home, f"127.0.0.1:{port}"
    finally:
        kill_all(pids_matching(temp) + pids_matching(f"127.0.0.1:{port}"))


JOIN = """
import sys, ray
from lvd.curation import runner
try:
    runner.init_ray(sys.argv[1])
except runner.RayJoinError as e:
    print("JOINERROR " + str(e))
    sys.exit(3)
print("RESULT", ray.get(ray.remote(lambda: 6 * 7).remote()))
ray.shutdown()
"""


def join(home: Path, address: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-c", JOIN, address],
        env=clean_env(home, PYTHONPATH=str(root)),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_join_token_cluster_as_the_user_would(token_cluster, tmp_path):
    """RAY_AUTH_MODE is not exported on the client: lvd uses ~/.ray/auth_token as Ray's CLI
    does. With another machine's token, the error is one line naming the file and setting."""
    home, address = token_cluster
    ok = join(home, address)
    assert ok.returncode == 0 and "RESULT 42" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-3000:]

    other = tmp_path / "other-home"
    (other / ".ray").mkdir(parents=True)
    (other / ".ray" / "auth_token").write_text(uuid.uuid4().hex * 2)
    bad = join(other, address)
    assert bad.returncode == 3, bad.stdout[-2000:] + bad.stderr[-3000:]
    (line,) = [ln for ln in bad.stdout.splitlines() if ln.startswith("JOINERROR ")]
    assert str(other / ".ray" / "auth_token") in line and "RAY_AUTH_MODE=token" in line
    assert "RAY_AUTH_TOKEN" in line and "refused" in line


ANALYTICS = """
from lvd.cli.curate import prepare_prefect_env
prepare_prefect_env()
from prefect.settings import get_current_settings
print("ANALYTICS", get_current_settings().server.analytics_enabled)
"""


@pytest.mark.parametrize("user", [None, "true"])
def test_prefect_analytics_off_unless_user_turns_them_on(tmp_path, user):
    extra = {} if user is None else {"PREFECT_SERVER_ANALYTICS_ENABLED": user}
    env = clean_env(tmp_path, PREFECT_HOME=str(tmp_path / "prefect"), **extra)
    out = subprocess.run([sys.executable, "-c", ANALYTICS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ANALYTICS {user == 'true'}" in out.stdout
