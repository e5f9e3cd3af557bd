"""Training-step throughput and peak memory of the lvd ViT on one GPU.

One step = forward + backward + AdamW update under bf16 autocast (fp32 master weights), the
way the trainer runs the student. Two input shapes are timed for each batch size B:
  single     B images at 224 px
  multicrop  B images as DINOv2 sees them: 2 global crops at 224 + 8 local crops at 98 px
The loss is a stand-in (mean square of CLS and patch outputs): it costs nothing next to the
backbone, which is what this measures. A batch size that runs out of memory prints OOM.

    python benchmarks/gpu_step.py                       # ViT-L/14, about 2 minutes on an H100
    python benchmarks/gpu_step.py --arch vit_giant2 --batch-sizes 16,32,64
    python benchmarks/gpu_step.py --smoke               # tiny model on CPU, a few seconds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from lvd.pretrain.models import ARCHITECTURES


@dataclass(frozen=True)
class Row:
    mode: str
    batch: int
    images_per_s: float | None
    step_ms: float | None
    peak_gib: float | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_large", choices=sorted(ARCHITECTURES), help="backbone to time")
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="comma-separated images per step")
    parser.add_argument("--modes", default="single,multicrop", help="comma-separated: single, multicrop")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--registers", type=int, default=4, help="register tokens")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (uniform)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block first")
    parser.add_argument("--smoke", action="store_true", help="vit_tiny, tiny batches, 2 steps, CPU ok")
    return parser.parse_args()


def crops(mode: str, batch: int, global_px: int, local_px: int, device) -> list[torch.Tensor]:
    if mode == "single":
        return [torch.randn(batch, 3, global_px, global_px, device=device)]
    return [
        torch.randn(2 * batch, 3, global_px, global_px, device=device),
        torch.randn(8 * batch, 3, local_px, local_px, device=device),
    ]


def train_step(model, optimizer, inputs: list[torch.Tensor], device) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = 0.0
        for x_BCHW in inputs:
            out = model(x_BCHW)
            loss = loss + out.cls_BD.float().square().mean() + out.patches_BND.float().square().mean()
    loss.backward()
    optimizer.step()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_one(model, optimizer, mode: str, batch: int, args, device, sizes: tuple[int, int]) -> Row:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        inputs = crops(mode, batch, *sizes, device)
        for _ in range(args.warmup):
            train_step(model, optimizer, inputs, device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, inputs, device)
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return Row(mode, batch, None, None, None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return Row(mode, batch, batch / seconds, seconds * 1e3, peak)


def print_table(rows: list[Row]) -> None:
    print(f"{'mode':<10} {'batch':>6} {'images/s':>10} {'step ms':>9} {'peak GiB':>9}")
    for r in rows:
        if r.images_per_s is None:
            print(f"{r.mode:<10} {r.batch:>6} {'OOM':>10}")
            continue
        peak = f"{r.peak_gib:9.2f}" if r.peak_gib is not None else f"{'-':>9}"
        print(f"{r.mode:<10} {r.batch:>6} {r.images_per_s:10.1f} {r.step_ms:9.1f} {peak}")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    overrides = {}
    if args.smoke:  # seconds on a busy CPU: 2 blocks of vit_tiny, 1 step
        args.arch, args.batch_sizes, args.steps, args.warmup = "vit_tiny", "2", 1, 1
        overrides = {"depth": 2}
    sizes = (56, 28) if args.smoke else (224, 98)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = (
        ARCHITECTURES[args.arch](
            img_size=sizes[0],
            num_register_tokens=args.registers,
            drop_path_rate=args.drop_path,
            drop_path_uniform=True,
            **overrides,
        )
        .to(device)
        .train()
    )
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.04, fused=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{args.arch} ({n_params / 1e6:.0f}M params) on {name}, torch {torch.__version__}, bf16 autocast, "
        f"AdamW, {args.steps} timed steps after {args.warmup} warmup, compile={args.compile}"
    )
    rows = [
        time_one(model, optimizer, mode, int(b), args, device, sizes)
        for mode in args.modes.split(",")
        for b in args.batch_sizes.split(",")
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
