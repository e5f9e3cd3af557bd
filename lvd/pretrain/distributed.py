"""The process group of a multi-rank run, set up from the environment torchrun exports
(launchers: `launch.py`).

torchrun (`python -m torch.distributed.run`) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process it starts; a plain `python` process has none
of them and trains alone without a process group. NCCL needs one GPU per rank; on CPU the
ranks talk over gloo (what the tests use: 2 processes, no GPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> str | None:
    """Join the process group torchrun describes; return the device string for this rank.

    Returns `device` unchanged when not launched by torchrun (single process) or when a group
    already exists. On CUDA each rank takes GPU LOCAL_RANK.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return device
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device or "cpu"


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks_mean(value: float, device: torch.device) -> float:
    """Mean of a per-rank float over the group (the value itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
