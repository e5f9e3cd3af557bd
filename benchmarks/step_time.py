"""CPU forward+backward time of our ViT-S/14 against timm's `vit_small_patch14_dinov2`.

Both models are built without weights at 224 px (same width, depth, heads, LayerScale, fused
qkv) and timed in the same process on the same input, alternating so that machine load hits
both alike. Prints, for wall time and for process CPU time, medians and the ratio timm / ours (>= 1.0
means we are at least as fast): of the medians, of the minima, and the median of per-pair
ratios. On a shared machine trust the CPU-time row and the paired ratios most.

    .venv/bin/python benchmarks/step_time.py --batch 4 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lvd.pretrain.models import vit_small


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    return parser.parse_args()


def build_timm() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)


def step_seconds(model: torch.nn.Module, x_BCHW: torch.Tensor, forward) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward. On a shared machine the CPU
    time barely moves when other jobs steal the cores; the wall time does."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    forward(model, x_BCHW).float().sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def ours_forward(model, x_BCHW):
    out = model(x_BCHW)
    return out.cls_BD.sum() + out.patches_BND.sum()


def timm_forward(model, x_BCHW):
    tokens_BTD = model.forward_features(x_BCHW)  # already after timm's final norm
    return tokens_BTD[:, 0].sum() + tokens_BTD[:, 1:].sum()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs = vit_small().train(), build_timm().train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    x_BCHW = torch.randn(args.batch, 3, 224, 224)
    for _ in range(args.warmup):
        step_seconds(ours, x_BCHW, ours_forward)
        step_seconds(theirs, x_BCHW, timm_forward)
    ours_s, theirs_s = [], []
    for i in range(args.repeats):  # alternate the order so load spikes hit both alike
        pair = [(ours, ours_forward, ours_s), (theirs, timm_forward, theirs_s)]
        for model, forward, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(step_seconds(model, x_BCHW, forward))
    print(f"threads={torch.get_num_threads()} batch={args.batch} repeats={args.repeats}")
    print(f"params: ours {n_ours / 1e6:.2f}M  timm {n_theirs / 1e6:.2f}M")
    for label, column in (("wall", 0), ("cpu ", 1)):
        o = [t[column] for t in ours_s]
        t = [t[column] for t in theirs_s]
        paired = statistics.median(b / a for a, b in zip(o, t))
        print(
            f"{label} ms  ours median {statistics.median(o) * 1e3:8.1f} min {min(o) * 1e3:8.1f} | "
            f"timm median {statistics.median(t) * 1e3:8.1f} min {min(t) * 1e3:8.1f} | "
            f"timm/ours: medians {statistics.median(t) / statistics.median(o):.3f} "
            f"mins {min(t) / min(o):.3f} paired {paired:.3f}"
        )


if __name__ == "__main__":
    main()
