"""The full DINOv2 training step of a recipe with FSDP2 against the same model without it.

One step is what `lvd pretrain` runs: teacher forward on the global crops, student forward
on global + local crops with iBOT masks, DINO + iBOT + KoLeo losses, backward, gradient
clipping, AdamW update and the EMA teacher update, in bf16 (autocast; FSDP2 with bf16
parameters and fp32 gradient reduction). Both variants run in this one process on the
same synthetic batch (random pixels: throughput does not depend on the content):

  plain   the MetaArch on the GPU, no sharding
  fsdp2   the same MetaArch (same seed) with `fully_shard` per block and per model over a
          one-rank process group, explicit prefetch on; under torchrun with N GPUs each
          rank holds 1/N of the weights and the batch size is per rank

Printed per variant: images/s (per rank and for all ranks), ms per step, peak memory
(max_memory_allocated), and model FLOPs utilisation = model FLOPs of one step (counted by
torch.utils.flop_counter on the plain model: matmuls and attention, forward + backward) /
step time / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; --peak-tflops to set
it). Then the ratio fsdp2 / plain for each.

    python benchmarks/gpu_fsdp.py                        # ViT-L/14 recipe, about 2 min on one H100
    torchrun --nproc-per-node 8 benchmarks/gpu_fsdp.py   # the same on 8 GPUs (plain: rank-local)
    python benchmarks/gpu_fsdp.py --smoke                # tiny recipe on CPU over gloo, seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from lvd.pretrain.data.augmentations import Crops
from lvd.pretrain.data.collate import collate
from lvd.pretrain.data.masking import MaskingConfig
from lvd.pretrain.meta_arch import MetaArch
from lvd.pretrain.optim import build_student_optimizer
from lvd.pretrain.parallel import Runtime, shard_meta_arch
from lvd.pretrain.recipes import get_recipe
from lvd.pretrain.schedules import build_schedules
from lvd.pretrain.train import _train_step

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


@dataclass(frozen=True)
class Row:
    variant: str
    images_per_s: float | None  # per rank
    step_ms: float | None
    peak_gib: float | None
    mfu: float | None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="vitl14", help="named recipe (default vitl14: ViT-L/14, 131k prototypes)")
    p.add_argument("--batch-size", type=int, default=None, help="images per rank and step (default: the recipe's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-prefetch", action="store_true", help="FSDP2 with implicit prefetch only")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one GPU")
    p.add_argument("--smoke", action="store_true", help="tiny recipe, batch 4, 1 step, CPU")
    return p.parse_args()


def init_group(device: torch.device) -> tuple[int, int]:
    """Join torchrun's group, or make a one-rank group of this process."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the one-rank group's store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def synthetic_batch(recipe, batch_size: int):
    c = recipe.crops
    g = torch.Generator().manual_seed(0)
    samples = [
        Crops(
            global_crops=[torch.randn(3, c.global_size, c.global_size, generator=g) for _ in range(2)],
            local_crops=[torch.randn(3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)],
        )
        for _ in range(batch_size)
    ]
    m = recipe.masks
    masking = MaskingConfig(
        sample_probability=m.sample_probability,
        ratio_min=m.ratio_min,
        ratio_max=m.ratio_max,
        patch_size=recipe.backbone.patch_size,
    )
    return collate(samples, masking, np.random.default_rng(0))


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_step_flops(meta, optimizer, batch, values, rt: Runtime) -> float:
    with FlopCounterMode(display=False) as counter:
        _train_step(meta, optimizer, batch, values, 0, rt)
    return float(counter.get_total_flops())


def time_variant(
    name: str, meta, optimizer, batch, values, rt: Runtime, args, flops: float | None, peak: float | None
) -> Row:
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(args.warmup):
            _train_step(meta, optimizer, batch, values, i, rt)
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            _train_step(meta, optimizer, batch, values, i, rt)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        return Row(name, None, None, None, None)
    mem = torch.cuda.max_memory_allocated() / 2**30 if rt.device.type == "cuda" else None
    mfu = flops / seconds / (peak * 1e12) if flops and peak else None
    return Row(name, batch.n_images / seconds, seconds * 1e3, mem, mfu)


def run_variant(name: str, recipe, batch, rt: Runtime, args, flops=None, peak=None):
    torch.manual_seed(0)
    meta = MetaArch(recipe).to(rt.device)
    if name == "fsdp2":
        shard_meta_arch(meta, rt, prefetch=not args.no_prefetch and rt.device.type == "cuda")
    meta.train()
    optimizer = build_student_optimizer(dict(meta.student.items()), recipe.optim)
    values = build_schedules(recipe.schedule_config(world_size=rt.world_size)).at(0)
    if name == "plain" and flops is None:
        flops = count_step_flops(meta, optimizer, batch, values, rt)
    row = time_variant(name, meta, optimizer, batch, values, rt, args, flops, peak)
    del meta, optimizer
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return row, flops


def fmt(v: float | None, spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if v is None else format(v, spec)


def report(rows: list[Row], rt: Runtime, flops: float) -> None:
    print(f"model FLOPs per step and rank: {flops / 1e9:,.1f} GFLOP")
    print(f"{'variant':<8} {'img/s/rank':>11} {'img/s all':>10} {'step ms':>9} {'peak GiB':>9} {'MFU':>7}")
    for r in rows:
        if r.step_ms is None:
            print(f"{r.variant:<8} {'out of memory':>11}")
            continue
        total = None if r.images_per_s is None else r.images_per_s * rt.world_size
        print(
            f"{r.variant:<8} {fmt(r.images_per_s, '11.1f')} {fmt(total, '10.1f')} "
            f"{fmt(r.step_ms, '9.1f')} {fmt(r.peak_gib, '9.2f')} {fmt(r.mfu, '7.1%')}"
        )
    plain, fsdp = rows
    if plain.images_per_s and fsdp.images_per_s:
        print(f"fsdp2 / plain: throughput {fsdp.images_per_s / plain.images_per_s:.3f}x", end="")
        if plain.peak_gib and fsdp.peak_gib:
            print(f", peak memory {fsdp.peak_gib / plain.peak_gib:.3f}x", end="")
        print()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    recipe = get_recipe("tiny" if args.smoke else args.recipe)
    if args.smoke:
        args.batch_size, args.steps, args.warmup = 4, 1, 1
    recipe = replace(recipe, batch_size=args.batch_size or recipe.batch_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    rank, world = init_group(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rt = Runtime(device, rank, world, torch.bfloat16 if device.type == "cuda" else None)
    batch = synthetic_batch(recipe, recipe.batch_size).to(device)
    peak = peak_tflops(args, device)
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(
            f"recipe {recipe.name} ({recipe.backbone.arch}), batch {recipe.batch_size}/rank x {world} ranks "
            f"on {name}, torch {torch.__version__}; {args.steps} timed steps after {args.warmup}; "
            f"peak {peak} TFLOP/s"
        )
    plain_rt = replace(rt, world_size=1)  # the plain model never talks to other ranks
    plain, flops = run_variant("plain", recipe, batch, plain_rt, args, peak=peak)
    fsdp, _ = run_variant("fsdp2", recipe, batch, rt, args, flops=flops, peak=peak)
    if rank == 0:
        report([plain, fsdp], rt, flops)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
