"""Where the training process runs: device, rank, precision, and how the model is wrapped.

The loop in `train.py` only sees a `Runtime` and calls `parallelize(model, runtime)`; this
is the one place that will apply FSDP2 `fully_shard` per block when several ranks train
(part 2). Single-process training needs no process group and leaves the model as is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None  # bf16 on GPU, none (fp32) on CPU

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device: str | None = None) -> Runtime:
    """Use `device` if given, else CUDA when present, else CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index or 0)
    return Runtime(dev, rank, world, torch.bfloat16 if dev.type == "cuda" else None)


def parallelize(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move the model to its device; multi-rank sharding is not implemented yet."""
    if runtime.world_size > 1:
        raise NotImplementedError(
            "multi-rank pretraining (FSDP2) is not available yet; run a single process"
        )
    return model.to(runtime.device)
