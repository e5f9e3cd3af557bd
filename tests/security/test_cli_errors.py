"""Every `lvd curate` / `lvd pipeline` / `lvd demo` failure is one `error:` line on stderr,
with exit 2 for bad usage, and parameters are refused before Prefect or Ray start.

Real command lines (subprocesses with a private PREFECT_HOME that report whether they imported Ray or Prefect), a real tmpfs for disk
full (the test runs as root; skipped otherwise), a real Ray task for the error mapping.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lvd.cli import checks
from lvd.curation import testdata

from .test_network import token_cluster  # noqa: F401 - a `ray start --head` cluster with token auth

ROOT = Path(__file__).resolve().parents[2]


# runs `python -m lvd.cli ARGV` and, at exit, writes which of Ray and Prefect it had imported
PROBE = """
import atexit, json, os, runpy, sys
def _report():
    with open(os.environ["LVD_TEST_IMPORTED"], "w") as f:
        json.dump(sorted(m for m in ("prefect", "ray") if m in sys.modules), f)
atexit.register(_report)
sys.argv = ["lvd", *sys.argv[1:]]
runpy.run_module("lvd.cli", run_name="__main__", alter_sys=True)
"""


def lvd(tmp: Path, *argv, timeout=60, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The command line's result, and which of Ray and Prefect it imported (a refusal before
    they start imports neither: it does not depend on how loaded the machine is, as a time did)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    imported = tmp / f"imported-{uuid.uuid4().hex}.json"
    e.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PYTHONPATH=str(ROOT),
        RAY_USAGE_STATS_ENABLED="0",
        LVD_TEST_IMPORTED=str(imported),
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, argv)],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, json.loads(imported.read_text()) if imported.is_file() else ["(no report)"]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


@pytest.mark.parametrize("command", ["curate", "pipeline"])
def test_missing_input_refused_fast_and_nothing_created(tmp_path, command):
    out = tmp_path / "out"
    done, imported = lvd(tmp_path, command, "--input", tmp_path / "missing", "--out", out)
    line = one_error_line(done)
    assert done.returncode == 2 and f"--input {tmp_path / 'missing'}: no such file or folder" in line
    assert imported == [], imported  # refused before Ray or Prefect
    assert not out.exists() and not (tmp_path / "prefect-home").exists()  # Prefect never started


def test_out_that_is_a_file_is_one_line(tmp_path):
    dump = tmp_path / "dump"
    testdata.write_photo_jpegs(dump, 1, side=64)
    (tmp_path / "file").write_text("x")
    for out, what in (
        (tmp_path / "file", "it is a file"),
        (tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file"),
    ):
        for command in ("curate", "pipeline", "demo"):
            argv = [command, "--out", out] + ([] if command == "demo" else ["--input", dump])
            done, imported = lvd(tmp_path, *argv)
            line = one_error_line(done)
            assert done.returncode == 2 and what in line and imported == [], (command, line, imported)


def test_unknown_model_paths_and_bad_numbers_all_in_one_line(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    done, imported = lvd(
        tmp_path,
        "curate",
        "--input",
        dump,
        "--out",
        tmp_path / "o",
        "--embedder",
        tmp_path / "dinov2.pth",
        "--copy-model",
        tmp_path / "sscd.pt",
        "--partition-size",
        "0",
        "--max-remove-fraction",
        "1.5",
    )
    line = one_error_line(done)
    for want in (
        f"--embedder {tmp_path / 'dinov2.pth'}: no such model",
        f"--copy-model {tmp_path / 'sscd.pt'}: no such model",
        "--partition-size 0",
        "--max-remove-fraction 1.5",
    ):
        assert want in line, want
    assert done.returncode == 2 and imported == [] and not (tmp_path / "o").exists(), imported
    # argparse's own refusals are one line too
    done, _ = lvd(tmp_path, "curate", "--input", dump, "--out", tmp_path / "o", "--overwrite", "--extend")
    assert "not allowed with argument --overwrite" in one_error_line(done) and done.returncode == 2


def test_refused_ray_address_is_one_line_before_prefect(token_cluster, tmp_path):
    """A cluster that refuses this user's token: one line, and Prefect never starts (the join
    happens in the command, before the flow)."""
    _, address = token_cluster
    dump = tmp_path / "dump"
    testdata.write_photo_jpegs(dump, 1, side=64)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex * 2)  # another machine's token
    done, imported = lvd(
        tmp_path,
        "curate",
        "--input",
        dump,
        "--out",
        tmp_path / "o",
        "--ray-address",
        address,
        timeout=240,
        HOME=str(home),
    )
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "refused" in errors[0] and str(home / ".ray" / "auth_token") in errors[0]
    assert "Traceback" not in done.stderr and "Flow run" not in done.stderr and "prefect" not in done.stderr.lower()
    assert not (tmp_path / "prefect-home").exists() or not any((tmp_path / "prefect-home").glob("*.db"))


# ---------------------------------------------------------------- disk full


@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_enospc_inside_a_ray_task_maps_to_path_and_stage(ray_local, tiny_disk):
    import ray

    @ray.remote(max_retries=0)
    def fill(folder: str) -> None:
        with open(os.path.join(folder, "part-000000.blobs.parquet"), "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
                os.fsync(f.fileno())

    run = tiny_disk / "run"
    (run / "ingest").mkdir(parents=True)
    with pytest.raises(Exception) as info:
        ray.get(fill.remote(str(run / "ingest")))
    assert checks.find_enospc(info.value) is not None
    msg = checks.disk_full(info.value, run)
    assert msg.startswith("disk full writing ") and " during " in msg
    # a write() on an open file names no path: the run folder and its stage folder then
    plain = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "shards" / "shard-000000.tar"))
    assert checks.disk_full(plain, run).startswith(
        f"disk full writing {run / 'shards' / 'shard-000000.tar'} during shards"
    )
    assert checks.disk_full(ValueError("x"), run) is None


def test_disk_full_run_is_one_line_naming_path_and_stage(tiny_disk, tmp_path):
    dump = tmp_path / "dump"
    testdata.write_photo_jpegs(dump, 30, side=256)  # ~0.5 MB of JPEG; ingest keeps the bytes
    (tmp_path / "home").mkdir()
    done, imported = lvd(
        tmp_path,
        "curate",
        "--input",
        dump,
        "--out",
        tiny_disk / "run",
        "--partition-size",
        "4",
        timeout=400,
        HOME=str(tmp_path / "home"),
    )
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-4000:]
    assert errors[0].startswith(f"error: disk full writing {tiny_disk / 'run'}"), errors
    assert re.search(r" during (ingest|dedup|copy-features|shard|ledger) ", errors[0]), errors  # a Prefect task
    # Prefect's log lines stay, one line each: no traceback (was 146 lines of RayTaskError)
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) < 25, done.stderr[-4000:]
