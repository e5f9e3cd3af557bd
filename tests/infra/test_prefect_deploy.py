"""End to end: prefect.yaml deployed to a Prefect server and run by a real process worker.

Slow (about 2 min on 2 cores): run with `pytest -m slow tests/infra`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
POOL = "lvd-process"  # the work pool prefect.yaml names


@pytest.mark.slow
def test_local_deployment_runs_on_a_process_worker(prefect_harness, tmp_path):
    """`prefect deploy --all` + a process worker run `curate/local` on 4 real photos.

    Only the pull step's directory and the paths are rewritten (to this checkout and tmp_path).
    """
    from PIL import Image
    from prefect.settings import PREFECT_API_URL
    from skimage import data

    from lvd.curation.ledger import verify_run

    dump, run = tmp_path / "dump", tmp_path / "run"
    dump.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(dump / f"{name}.jpg")
    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    cfg["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] = str(ROOT)
    for dep in cfg["deployments"]:  # every deployment is registered; curate/local is run
        if dep["entrypoint"].endswith(":curate"):
            dep["parameters"].update(inputs=[str(dump)], out=str(run))
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(cfg))

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prefect = [sys.executable, "-m", "prefect"]

    def sh(*args: str, timeout: int = 300) -> str:
        res = subprocess.run([*prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout + res.stderr

    sh("work-pool", "create", POOL, "--type", "process", "--overwrite")
    sh("--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
    sh("deployment", "run", "curate/local")
    log = sh("worker", "start", "--pool", POOL, "--run-once", timeout=600)
    assert "Finished in state Completed()" in log, log[-3000:]
    report = verify_run(run)
    assert report.ok and report.inputs == 4 and report.by_status == {"sharded": 4}, report
