"""Cost of our overflow-free Sinkhorn-Knopp against the official direct-exp one.

All run in the same process on the same logits (scaled so the official version stays
finite), alternating rounds so machine load hits all alike. Prints medians and the ratios
ours / official for the default path (column-max shift) and the log-space fallback,
plus the max abs difference to the official result.

    .venv/bin/python benchmarks/sinkhorn.py --rows 512 --protos 16384 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lvd.pretrain.losses import sinkhorn_knopp


def official_direct_exp(logits_BK: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The official single-process algorithm (dinov2/loss/dino_clstoken_loss.py), restated."""
    q_KB = torch.exp(logits_BK.float() / temp).T
    n_protos, n_rows = q_KB.shape
    q_KB = q_KB / q_KB.sum()
    for _ in range(n_iterations):
        q_KB = q_KB / q_KB.sum(dim=1, keepdim=True) / n_protos
        q_KB = q_KB / q_KB.sum(dim=0, keepdim=True) / n_rows
    return (q_KB * n_rows).T


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="teacher rows B (crops x images)")
    parser.add_argument("--protos", type=int, default=16384, help="prototypes K")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logits = torch.randn(args.rows, args.protos) * 0.5  # /0.04 stays far below exp's overflow
    runs = {"shifted": [], "log-space": [], "official": []}
    for _ in range(args.repeats + 1):  # first round is warm-up
        runs["shifted"].append(timed(sinkhorn_knopp, logits, 0.04))
        runs["log-space"].append(timed(lambda x, t: sinkhorn_knopp(x, t, log_space=True), logits, 0.04))
        runs["official"].append(timed(official_direct_exp, logits, 0.04))
    med = {k: statistics.median(v[1:]) for k, v in runs.items()}
    diff = (sinkhorn_knopp(logits, 0.04) - official_direct_exp(logits, 0.04)).abs().max().item()
    print(
        f"B={args.rows} K={args.protos}: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
        + f"; ratio shifted/official {med['shifted'] / med['official']:.2f}, "
        f"log-space/official {med['log-space'] / med['official']:.2f}, max |diff| {diff:.2e}"
    )


if __name__ == "__main__":
    main()
