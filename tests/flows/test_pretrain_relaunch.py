"""The `pretrain` flow on 2 gloo ranks (a child `lvd pretrain --nproc-per-node 2`): one rank
is killed with SIGKILL after the first checkpoint is complete, while training, and the flow
relaunches from that checkpoint and finishes the run.

Each launch starts 3 Python processes that import torch (about 20 s on 2 idle cores), so
the run is kept to 3 launches of a few steps; bit-exact losses after a resume are tested
in tests/pretrain/test_fsdp.py, here the relaunch is checked to continue from the
checkpoint's step and to retrain the steps the killed launch had begun.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prefect_runs import run_artifacts

from lvd.cli import main as cli
from lvd.datasets import load_fashion_mnist, write_shards
from lvd.flows.pretrain_flow import read_metrics
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.failures import ResumeMismatchError

FIRST_END, END = 2, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    x, _ = load_fashion_mnist("test")
    root = tmp_path_factory.mktemp("relaunch-shards")
    write_shards(x[:64], root, samples_per_shard=16, size=56)
    return root


class RankKiller(threading.Thread):
    """SIGKILLs rank 1 as soon as its pid file appears: train() writes it once the rank has
    built the model and restored the checkpoint, right before its first step."""

    def __init__(self, out: Path, timeout_s: float = 400) -> None:
        super().__init__(daemon=True)
        self.pid_file, self.deadline = out / "ranks" / "rank1.pid", time.monotonic() + timeout_s
        self.pid: int | None = None

    def run(self) -> None:
        while time.monotonic() < self.deadline and self.pid is None:
            if self.pid_file.exists():  # written whole (os.replace)
                self.pid = int(self.pid_file.read_text().split()[0])
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.02)


def _run_artifact(flow_run_id, key: str):
    return run_artifacts(flow_run_id, [key])[key]  # this run's, not another test's


def _warnings(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterFlowRunId,
        LogFilterLevel,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches
    with get_client(sync_client=True) as c:
        logs = c.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), level=LogFilterLevel(ge_=logging.WARNING)
            )
        )
    return [x.message for x in logs]


def test_killed_rank_is_relaunched_from_the_checkpoint(prefect_harness, shards, tmp_path):
    from lvd.flows.pretrain_flow import pretrain

    out = tmp_path / "run"
    # the first checkpoint, from the command line the flow launches (here in-process:
    # one torch import fewer than a child process)
    assert (
        cli.main(
            [
                "pretrain",
                "--shards",
                str(shards),
                "--recipe",
                "tiny",
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--nproc-per-node",
                "2",
                "--deterministic",
                "--max-steps",
                str(FIRST_END),
            ]
        )
        == 0
    )
    assert ckpt.read_meta(ckpt.latest_checkpoint(out)).world_size == 2
    assert not list((out / "ranks").glob("*.pid"))  # ranks that finished remove theirs
    first_rows = read_metrics(out / "metrics.jsonl")

    killer = RankKiller(out)
    killer.start()
    state = pretrain(
        shards=[str(shards)],
        out=str(out),
        recipe="tiny",
        batch_size=4,
        num_workers=0,
        nproc_per_node=2,
        deterministic=True,
        max_steps=END,
        resume=True,
        return_state=True,
    )
    killer.join(1)
    assert killer.pid is not None, "rank 1 was never killed"
    assert state.is_completed()
    summary = state.result()
    assert (summary.start_step, summary.end_step, summary.relaunches) == (FIRST_END, END, 1)
    assert summary.checkpoint == str(ckpt.checkpoint_dir(out, END))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_0000002", "step_0000004"]

    # launch 1 resumed, lost rank 1 to the signal; launch 2 resumed from step 2 and finished
    killed = (out / "launch-1.log").read_text()
    assert killed.splitlines()[0].endswith("--resume")
    assert str(killer.pid) in killed and "SIGKILL" in killed  # the launcher names the rank
    assert "trained steps" not in killed
    again = (out / "launch-2.log").read_text()
    assert again.splitlines()[0].endswith("--resume")
    assert f"trained steps {FIRST_END}..{END} of recipe tiny" in again
    assert not (out / "launch-3.log").exists()
    assert not list((out / "ranks").glob("*.pid"))  # the relaunched ranks ended cleanly

    warned = [m for m in _warnings(state.state_details.flow_run_id) if "relaunching" in m]
    assert len(warned) == 1
    assert "exited with code 1" in warned[0] and str(out / "launch-1.log") in warned[0]
    assert f"--resume from {ckpt.checkpoint_dir(out, FIRST_END)}" in warned[0]

    rows = read_metrics(out / "metrics.jsonl")  # tiny logs every 10 steps and at the end
    assert [r["step"] for r in rows] == [FIRST_END - 1, END - 1]
    assert rows[0] == first_rows[0]  # the line before the checkpoint is kept as it was
    assert rows[1]["loss"] != rows[0]["loss"]
    run_id = state.state_details.flow_run_id
    assert "| relaunches | 1 |" in _run_artifact(run_id, "pretrain-summary").data
    assert _run_artifact(run_id, "pretrain-progress").data == 100.0

    # these 2-rank checkpoints resume on any number of ranks up to the run's 4 data streams
    # (one per shard here); 5 ranks are refused before any process starts
    logs = sorted(out.glob("launch-*.log"))
    with pytest.raises(ResumeMismatchError, match="written by 2 rank.*4 streams; 5 ranks"):
        pretrain(
            shards=[str(shards)],
            out=str(out),
            recipe="tiny",
            batch_size=4,
            nproc_per_node=5,
            max_steps=END + 2,
            resume=True,
        )
    assert sorted(out.glob("launch-*.log")) == logs
