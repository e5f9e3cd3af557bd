"""Where the training process runs: device, rank, precision, and how the model is wrapped.

The loop in `train.py` only sees a `Runtime` and calls `parallelize(build, runtime)`; this
is the one place that applies FSDP2 `fully_shard` (per transformer block, then per model:
student backbone, each student head, and the teacher the same way) when several ranks
train. Single-process training needs no process group and leaves the model as is.

What is global and what is per rank under FSDP2 (each rank sees its own slice of the batch):
- gradients: FSDP2 reduce-scatters the mean over ranks, so the update equals the update of
  one process on the concatenated batch (the DINO and iBOT losses are per-rank means over
  equal-sized slices, and the mean of the means is the global mean);
- teacher centring: Sinkhorn-Knopp sums and the softmax centres are all-reduced in the
  losses, so the teacher targets are those of the global batch;
- KoLeo is per rank, as in the official code: its nearest neighbours are searched in the
  rank's own slice only (an all-gather of the CLS tokens would cost memory and time for a
  regulariser), so it differs from one process on the global batch;
- the logged losses are rank 0's per-rank values, like the official trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


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


def _mp_policy(runtime: Runtime) -> MixedPrecisionPolicy:
    # bf16 compute weights with fp32 gradient reduction on GPU; CPU stays fp32 throughout.
    if runtime.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard_model(model: nn.Module, mesh, policy: MixedPrecisionPolicy, *, prefetch: bool) -> None:
    """One FSDP unit per transformer block (so only one block is gathered at a time), then
    the model itself for what is left (embeddings, final norm, head MLP, prototypes)."""
    blocks = list(getattr(model, "blocks", ()))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if prefetch and len(blocks) > 1:
        # FSDP2's implicit prefetch issues block i+1's all-gather only once the CPU reaches
        # it; when the CPU runs ahead of the GPU that is early enough, but with small
        # per-rank batches the CPU is the bottleneck and the gather sits on the critical
        # path. Naming the next block (forward) / previous block (backward) issues it at once.
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                block.set_modules_to_forward_prefetch([blocks[i + 1]])
            if i > 0:
                block.set_modules_to_backward_prefetch([blocks[i - 1]])


def shard_meta_arch(model: nn.Module, runtime: Runtime, *, prefetch: bool | None = None) -> nn.Module:
    """Apply FSDP2 to every student and teacher module of a `MetaArch` already on its
    device, over all ranks of the process group (one rank included: benchmarks compare
    FSDP2 with the plain model that way). Explicit prefetch defaults on for CUDA."""
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = _mp_policy(runtime)
    prefetch = runtime.device.type == "cuda" if prefetch is None else prefetch
    for part in (model.student, model.teacher):
        for module in part.values():
            _shard_model(module, mesh, policy, prefetch=prefetch)
    return model


def parallelize(build: Callable[[], nn.Module], runtime: Runtime) -> nn.Module:
    """Build a `MetaArch` with `build()` on its device and, with several ranks, sharded.

    One process: `build()` moved to the device. Several ranks: only rank 0 builds the real
    (full, CPU) model; every rank builds the same model on the meta device (no memory),
    shards it with `fully_shard`, allocates its own shards (`to_empty`) and receives their
    values from rank 0 (`broadcast_from_rank0`). Host memory per node is then one full
    model plus the shards, not one full model per rank (ViT-g student + teacher is about
    9 GB in fp32), and every rank starts from rank 0's weights bit for bit, as one process
    building with the same seed would.
    """
    if runtime.world_size == 1:
        return build().to(runtime.device)
    full = build() if runtime.rank == 0 else None
    with torch.device("meta"):
        model = build()
    shard_meta_arch(model, runtime)
    model.to_empty(device=runtime.device)
    set_model_state_dict(
        model,
        full.state_dict() if full is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    return model


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit in `module` (no-op without FSDP2).

    FSDP2 keeps a root module's weights gathered after forward, expecting a backward that
    the no-grad teacher never runs; until resharded its parameters are the full tensors,
    not the shards the EMA update pairs with the student's.
    """
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unsharded_copy(module: nn.Module, build: Callable[[], nn.Module], runtime: Runtime) -> nn.Module | None:
    """A plain (unsharded) copy of `module` on rank 0 and None elsewhere; every rank must
    call it (the weights are gathered). In one process, `module` itself."""
    if runtime.world_size == 1:
        return module
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.rank != 0:
        return None
    copy = build()
    copy.load_state_dict(sd)
    return copy.to(runtime.device).eval()


def local_tensors(params) -> list[torch.Tensor]:
    """The rank's own shards of (possibly DTensor) parameters, for foreach updates in place."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor as the whole tensor (a collective: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
