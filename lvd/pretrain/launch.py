"""Start `train(cfg)` on the ranks of one of four launchers; every rank runs `train_rank`.

| kind | where the ranks run | process group |
|---|---|---|
| `local` | this process (or the ranks of a torchrun you started yourself) | none, or torchrun's |
| `torchrun` | `nproc_per_node` processes here through torch's elastic launcher; with `nnodes` > 1 the same launch on every node meets at a c10d rendezvous (`rdzv_endpoint`) | from torchrun's env (`init_distributed`) |
| `ray` | Ray Train `TorchTrainer` workers on a Ray cluster | Ray Train's own (gloo on CPU, NCCL on GPU) |
| `slurm` | a submitit job of `nnodes` x `nproc_per_node` tasks (Slurm, or submitit's local executor) | from submitit's env export (`init_distributed`) |

Every rank writes its part of each DCP checkpoint under `cfg.out`, so with ranks on several
machines `cfg.out` must be one shared filesystem mounted at the same path everywhere.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

from lvd.pretrain.distributed import close_distributed, launched_by_torchrun
from lvd.pretrain.failures import EXIT_REPEATS, RepeatingFailure, repeats
from lvd.pretrain.train import TrainConfig, TrainResult, train

LaunchKind = Literal["local", "torchrun", "ray", "slurm"]
KINDS = ("local", "torchrun", "ray", "slurm")
RESULT_KEY = "lvd_train_result"  # rank 0's TrainResult in the metrics Ray Train reports


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    kind: LaunchKind = "local"
    nproc_per_node: int = 1  # torchrun: ranks per node; slurm: tasks per node
    nnodes: int = 1  # torchrun / slurm
    rdzv_endpoint: str | None = None  # torchrun with nnodes > 1: HOST:PORT on the first node
    rdzv_id: str = "lvd-pretrain"  # torchrun: the same on every node of one run
    ray_address: str | None = None  # "auto", "local", "ray://HOST:10001", "HOST:6379"
    ray_workers: int = 1
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 0.0  # > 0: workers on GPUs over NCCL
    slurm_partition: str | None = None
    slurm_time_min: int = 60
    slurm_gpus_per_node: int = 0
    slurm_cpus_per_task: int | None = None  # None: the cluster's default (often 1)
    slurm_folder: Path | None = None  # default: OUT/slurm
    slurm_local: bool = False  # submitit's local executor: the job runs on this machine

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"launcher kind {self.kind!r} unknown; use one of {KINDS}")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} / --nnodes {self.nnodes}: use 1 or more")
        if self.kind in ("local", "ray") and (self.nproc_per_node, self.nnodes) != (1, 1):
            hint = (
                "set the number of Ray Train workers with --ray-workers"
                if self.kind == "ray"
                else "launch with kind='torchrun'"
            )
            raise ValueError(f"--nproc-per-node/--nnodes are for torchrun and Slurm: {hint}")
        if self.kind == "torchrun":
            self._check_torchrun()
        if self.kind == "ray":
            self._check_ray()
        if self.kind == "slurm":
            self._check_slurm()

    def _check_torchrun(self) -> None:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT: a free "
                "port on one node that every node reaches (e.g. node0:29500), "
                "given the same on every node"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: write HOST:PORT, e.g. node0:29500")

    def _check_ray(self) -> None:
        if not self.ray_address:
            raise ValueError(
                "a Ray launch needs --ray-address: 'auto' (the cluster this "
                "machine belongs to), 'local' (a new one here) or HOST:PORT"
            )
        if self.ray_workers < 1:
            raise ValueError(f"--ray-workers {self.ray_workers}: use 1 or more")
        if self.ray_cpus_per_worker <= 0 or self.ray_gpus_per_worker < 0:
            raise ValueError("--ray-cpus-per-worker must be > 0 and --ray-gpus-per-worker >= 0")

    def _check_slurm(self) -> None:
        if self.rdzv_endpoint is not None:
            raise ValueError("a Slurm job finds its first node itself: drop --rdzv-endpoint")
        if self.slurm_time_min < 1:
            raise ValueError(f"--slurm-time-min {self.slurm_time_min}: use 1 or more minutes")
        if self.slurm_gpus_per_node not in (0, self.nproc_per_node):
            raise ValueError(
                f"--slurm-gpus-per-node {self.slurm_gpus_per_node} with "
                f"--nproc-per-node {self.nproc_per_node}: one rank per GPU, so "
                "give both the same number (or 0 GPUs for CPU ranks)"
            )
        if self.slurm_cpus_per_task is not None and self.slurm_cpus_per_task < 1:
            raise ValueError(f"--slurm-cpus-per-task {self.slurm_cpus_per_task}: use 1 or more")
        if self.slurm_local and self.nnodes > 1:
            raise ValueError("--slurm-local runs the job on this machine only: use --nnodes 1")

    @property
    def ray_use_gpu(self) -> bool:
        return self.ray_gpus_per_worker > 0


def train_rank(cfg: TrainConfig) -> TrainResult:
    """What every rank of every launcher runs: train in the process group the launcher set
    up or described, then leave it if this call made it (Ray Train tears its own down).

    A rank that fails leaves the group as it is: the barrier of a clean exit would wait for
    ranks stuck in a collective; its process ends and the launcher reports the failure."""
    made_here = not (dist.is_available() and dist.is_initialized())
    try:
        result = train(cfg)
    except Exception as e:
        if launched_by_torchrun() and repeats(e):  # the launcher reads exit codes, not messages
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            traceback.print_exc()
            sys.stderr.flush()
            get_error_handler().record_exception(e)  # torchrun's error file: the launcher's message
            raise SystemExit(EXIT_REPEATS) from e
        raise
    if made_here:
        close_distributed()
    return result


def launch(cfg: TrainConfig, spec: LaunchSpec) -> TrainResult:
    """Train `cfg` on the ranks `spec` describes; return rank 0's result (on a torchrun node
    that does not hold rank 0: the result of this node's first rank)."""
    if spec.kind == "torchrun":
        return _launch_torchrun(cfg, spec)
    if spec.kind == "ray":
        return _launch_ray(cfg, spec)
    if spec.kind == "slurm":
        return submit_slurm(cfg, spec).results()[0]  # one per task, in global rank order
    return train_rank(cfg)


# ---------------------------------------------------------------- torchrun


def _launch_torchrun(cfg: TrainConfig, spec: LaunchSpec) -> TrainResult:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if launched_by_torchrun():
        raise RuntimeError("already inside torchrun: run lvd pretrain without --nproc-per-node/--nnodes there")
    if spec.rdzv_endpoint is None:  # one node: what `torchrun --standalone` does
        endpoint, run_id = "localhost:0", f"lvd-{uuid.uuid4().hex[:8]}"
    else:
        endpoint, run_id = spec.rdzv_endpoint, spec.rdzv_id
    config = LaunchConfig(
        min_nodes=spec.nnodes,
        max_nodes=spec.nnodes,
        nproc_per_node=spec.nproc_per_node,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        max_restarts=0,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, train_rank)(cfg)  # keyed by global rank
    except ChildFailedError as e:
        if any(f.exitcode == EXIT_REPEATS for f in e.failures.values()):
            rank, failure = min((r, f) for r, f in e.failures.items() if f.exitcode == EXIT_REPEATS)
            raise RepeatingFailure(
                f"rank {rank} stopped on a failure a relaunch would repeat "
                f"(exit code {EXIT_REPEATS}): {_error_of(failure)}"
            ) from e
        raise
    return results[min(results)]


def _error_of(failure) -> str:
    """The exception line a rank's error file holds (torchrun's ProcessFailure), else a pointer."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip().splitlines()[0] if str(message).strip() else "see its traceback above"


# ---------------------------------------------------------------- Ray Train


def _result_to_dict(r: TrainResult) -> dict[str, Any]:
    return {
        "out": str(r.out),
        "start_step": r.start_step,
        "end_step": r.end_step,
        "last_checkpoint": None if r.last_checkpoint is None else str(r.last_checkpoint),
        "losses": r.losses,
    }


def _result_from_dict(d: dict[str, Any]) -> TrainResult:
    last = d["last_checkpoint"]
    return TrainResult(
        out=Path(d["out"]),
        start_step=d["start_step"],
        end_step=d["end_step"],
        last_checkpoint=None if last is None else Path(last),
        losses=list(d["losses"]),
    )


def _ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train on the device Ray assigned, then rank 0 hands its result to
    the driver. Ray Train V2 keeps only metrics that come with a checkpoint, so rank 0
    reports a one-file Ray checkpoint (`train_result.json`, persisted under OUT/ray); every
    worker must call `report` the same number of times."""
    import ray.train
    from ray.train.torch import get_device

    cfg: TrainConfig = replace(config["cfg"], device=str(get_device()))
    result = train_rank(cfg)
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({})
        return
    payload = _result_to_dict(result)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train_result.json").write_text(json.dumps(payload))
        ray.train.report({RESULT_KEY: payload}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _launch_ray(cfg: TrainConfig, spec: LaunchSpec) -> TrainResult:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized()  # a Ray this process already joined is used as is
    if started:
        ray.init(address=spec.ray_address)
    resources = {"CPU": spec.ray_cpus_per_worker}
    if spec.ray_use_gpu:
        resources["GPU"] = spec.ray_gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(
            num_workers=spec.ray_workers, use_gpu=spec.ray_use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if spec.ray_use_gpu else "gloo"),
        # Ray's run state and the result checkpoint go under OUT (shared storage), not ~/ray_results
        run_config=RunConfig(name=f"launch-{uuid.uuid4().hex[:8]}", storage_path=str(Path(cfg.out).resolve() / "ray")),
    )
    try:
        return _result_from_dict(trainer.fit().metrics[RESULT_KEY])
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- submitit / Slurm


def _slurm_task(cfg: TrainConfig) -> TrainResult:
    """One task of the submitit job: export RANK/WORLD_SIZE/MASTER_* from the job's
    environment (torchrun's variables), then the same per-rank function. CUDA_VISIBLE_DEVICES
    is left alone: `init_distributed` picks GPU LOCAL_RANK among the node's GPUs."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return train_rank(cfg)


def submit_slurm(cfg: TrainConfig, spec: LaunchSpec):
    """Submit the training as a submitit job and return the `submitit.Job`: `results()[0]`
    waits and returns rank 0's `TrainResult`; `paths.stdout` / `paths.stderr` are rank 0's
    logs, `job.task(k).paths` those of rank k."""
    import submitit

    if spec.kind != "slurm":
        raise ValueError(f"submit_slurm needs a LaunchSpec of kind 'slurm', not {spec.kind!r}")
    if not spec.slurm_local and shutil.which("sbatch") is None:
        raise RuntimeError(
            "--slurm needs Slurm's sbatch on PATH (run on a login node); "
            "--slurm-local runs the job on this machine instead, for testing"
        )
    folder = spec.slurm_folder or Path(cfg.out) / "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if spec.slurm_local else "slurm")
    params: dict[str, Any] = {
        "name": "lvd-pretrain",
        "nodes": spec.nnodes,
        "tasks_per_node": spec.nproc_per_node,
        "timeout_min": spec.slurm_time_min,
    }
    if spec.slurm_gpus_per_node:
        params["gpus_per_node"] = spec.slurm_gpus_per_node
    if spec.slurm_cpus_per_task:
        params["cpus_per_task"] = spec.slurm_cpus_per_task
    if spec.slurm_partition:
        params["slurm_partition"] = spec.slurm_partition
    executor.update_parameters(**params)
    return executor.submit(_slurm_task, cfg)
