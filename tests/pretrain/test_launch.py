"""One training function, four ways to start its ranks: `lvd pretrain` through torchrun on one
node (the reference), two torchrun "nodes" meeting at a c10d rendezvous, Ray Train's
TorchTrainer on the local test Ray (2 CPU workers over gloo), and a submitit job on
submitit's local executor (2 tasks).

Every run is the same tiny 2-rank CPU run (deterministic, same seed, same shards, each rank
reading its own half of the data), so the launchers must give bit-identical results: rank 0's
logged losses, the printed last loss, and every weight of the trained teacher. Measured: equal
to the last bit, so the comparison is exact (tolerance 0).

About 1.5-2 min on 2 busy cores; the two-node run and the Ray failure are marked slow
(about 1.5 min more): `pytest -m slow tests/pretrain/test_launch.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from lvd.cli.main import main
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.launch import LaunchSpec

from .test_fsdp import shards  # noqa: F401 (module fixture: 64 Fashion-MNIST images, 4 shards)

STEPS = 2


def pretrain_args(shard_files: list[str], out: Path) -> list[str]:
    return [
        "pretrain",
        "--shards",
        *shard_files,
        "--recipe",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--deterministic",
    ]


def printed_loss(text: str) -> str:
    (loss,) = re.findall(rf"trained steps 0\.\.{STEPS} of recipe tiny; last loss (\S+);", text)
    return loss


def rank0_losses(out: Path) -> dict[str, float]:
    (line,) = (out / "metrics.jsonl").read_text().splitlines()  # log_every 10: the last step
    record = json.loads(line)
    assert record["step"] == STEPS - 1
    return {k: record[k] for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss")}


def assert_same_run(out: Path, reference: Path) -> None:
    last = ckpt.latest_checkpoint(out)
    assert last == out / "checkpoints" / f"step_{STEPS:07d}" and ckpt.is_complete(last)
    assert ckpt.read_meta(last).world_size == 2
    assert sorted(p.name for p in last.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert rank0_losses(out) == rank0_losses(reference)
    got, expected = ckpt.load_teacher_backbone(out), ckpt.load_teacher_backbone(reference)
    for (name, a), b in zip(got.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):  # noqa: F811
    """The 2-rank run through the elastic launcher (`--nproc-per-node 2`, one node)."""
    out = tmp_path_factory.mktemp("launch") / "torchrun"
    buf = StringIO()
    with redirect_stdout(buf):
        assert main([*pretrain_args(shards, out), "--nproc-per-node", "2"]) == 0
    # the run trained: step 1's losses are not those of the untrained start
    assert rank0_losses(out)["loss"] > 0
    return out, printed_loss(buf.getvalue())


def assert_ray_cpus_come_back(ray) -> None:
    """The workers' CPUs go back to the session's Ray for the tests after this one."""
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_ray_train_matches_torchrun(shards, reference, ray_local, tmp_path, capsys):  # noqa: F811
    ref_out, ref_loss = reference
    out = tmp_path / "ray"
    # the test Ray (2 CPUs) is already running: `local` joins it, 2 workers x 1 CPU fit
    # (Ray Train would wait for CPUs held elsewhere rather than fail)
    free = ray_local.available_resources().get("CPU", 0)
    assert free >= 2, f"another test holds the test Ray's CPUs ({free} free)"
    assert (
        main(
            [*pretrain_args(shards, out), "--ray-address", "local", "--ray-workers", "2", "--ray-cpus-per-worker", "1"]
        )
        == 0
    )
    assert printed_loss(capsys.readouterr().out) == ref_loss  # rank 0's result reached us
    assert_same_run(out, ref_out)
    # Ray's own run state lives under OUT, with rank 0's result as its checkpoint
    (result_file,) = (out / "ray").glob("launch-*/checkpoint_*/train_result.json")
    assert json.loads(result_file.read_text())["end_step"] == STEPS
    assert_ray_cpus_come_back(ray_local)


def test_submitit_local_matches_torchrun(shards, reference, tmp_path, capsys):  # noqa: F811
    ref_out, ref_loss = reference
    out = tmp_path / "slurm"
    assert (
        main(
            [
                *pretrain_args(shards, out),
                "--slurm",
                "--slurm-local",
                "--nproc-per-node",
                "2",
                "--slurm-time-min",
                "10",
                "--slurm-cpus-per-task",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed_loss(printed) == ref_loss
    job_id, stdout, stderr = re.search(r"submitted job (\S+); rank 0 logs: (\S+) (\S+)", printed).groups()
    assert Path(stdout).parent == out / "slurm" and job_id in Path(stdout).name
    log = Path(stdout).read_text()  # rank 0's log: submitit's record of the task
    assert "global_rank=0(2)" in log and "Job completed successfully" in log
    assert Path(stderr).is_file()
    assert_same_run(out, ref_out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 4 processes importing torch: about 60 s on the shared 2 cores
def test_two_nodes_meet_at_rendezvous(shards, reference, tmp_path):  # noqa: F811
    """Two `lvd pretrain --nnodes 2 --nproc-per-node 1` processes, as on two machines: both
    name this host's rendezvous endpoint, one of them hosts the c10d store."""
    ref_out, ref_loss = reference
    out = tmp_path / "two-nodes"
    cmd = [
        sys.executable,
        "-m",
        "lvd.cli",
        *pretrain_args(shards, out),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"localhost:{free_port()}",
        "--rdzv-id",
        "test-two-nodes",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-2000:] + stderr[-5000:]
    # each node prints its own first rank's result; one of them holds rank 0
    assert ref_loss in [printed_loss(stdout) for stdout, _ in outputs]
    assert_same_run(out, ref_out)


# ---------------------------------------------------------------- refused launches


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "torchrun", "nnodes": 2}, "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        ({"kind": "torchrun", "nnodes": 2, "rdzv_endpoint": "node0"}, "write HOST:PORT"),
        ({"kind": "torchrun", "nproc_per_node": 0}, "use 1 or more"),
        ({"kind": "ray"}, "needs --ray-address"),
        ({"kind": "ray", "ray_address": "auto", "nproc_per_node": 2}, "--ray-workers"),
        ({"kind": "ray", "ray_address": "auto", "ray_workers": 0}, "--ray-workers 0"),
        ({"kind": "slurm", "nproc_per_node": 4, "slurm_gpus_per_node": 2}, "one rank per GPU"),
        ({"kind": "slurm", "rdzv_endpoint": "h:1"}, "drop --rdzv-endpoint"),
        ({"kind": "slurm", "slurm_local": True, "nnodes": 2}, "--nnodes 1"),
        ({"kind": "slurm", "slurm_cpus_per_task": 0}, "--slurm-cpus-per-task 0"),
        ({"kind": "mpi"}, "use one of"),
    ],
)
def test_launch_spec_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LaunchSpec(**kwargs)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ray-address", "auto", "--slurm"], "pick different launchers"),
        (["--ray-address", "auto", "--nproc-per-node", "2"], "set their number with --ray-workers"),
        (["--ray-workers", "2"], "--ray-workers only apply with --ray-address"),
        (["--slurm-partition", "gpu"], "--slurm-partition only apply with --slurm"),
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--slurm", "--rdzv-endpoint", "h:29500"], "drop --rdzv-endpoint"),
    ],
)
def test_cli_refuses_mixed_or_incomplete_launchers(flags, message, tmp_path):
    # refused before the shards are even looked at
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["pretrain", "--shards", str(tmp_path / "none"), "--out", str(tmp_path), *flags])


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has Slurm")
def test_slurm_without_sbatch_points_to_slurm_local(shards, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="--slurm-local runs the job on this machine"):
        main([*pretrain_args(shards, tmp_path / "o"), "--slurm"])


@pytest.mark.parametrize(
    "kind",
    [
        "torchrun",
        "slurm",
        pytest.param("ray", marks=pytest.mark.slow),  # Ray: about 25 s more
    ],
)
def test_a_failing_run_raises_the_ranks_error(kind, request, tmp_path):
    """Every rank refuses a shard that is not a tar before it builds anything; the launcher
    raises, and its error carries the ranks' message."""
    from lvd.pretrain.launch import launch
    from lvd.pretrain.recipes import tiny
    from lvd.pretrain.train import TrainConfig

    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"not a tar file " * 100)
    spec = {
        "torchrun": LaunchSpec(kind="torchrun", nproc_per_node=2),
        "ray": LaunchSpec(kind="ray", ray_address="local", ray_workers=2),
        "slurm": LaunchSpec(kind="slurm", nproc_per_node=2, slurm_local=True),
    }[kind]
    ray = request.getfixturevalue("ray_local") if kind == "ray" else None
    cfg = TrainConfig(shards=(str(bad),), recipe=tiny(), out=tmp_path / "out", num_workers=0)
    with pytest.raises(Exception, match="unusable shards") as failed:
        launch(cfg, spec)
    assert str(bad) in str(failed.value)
    if ray is not None:
        assert_ray_cpus_come_back(ray)
