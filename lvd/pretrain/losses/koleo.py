"""KoLeo regulariser (Kozachenko-Leonenko differential entropy estimator).

Sablayrolles et al. 2019, "Spreading vectors for similarity search": for L2-normalised
vectors x_i with nearest neighbour distance d_i, the loss is -mean_i log(d_i + eps);
minimising it spreads the batch uniformly over the sphere.

Like the official DINOv2 (`dinov2/loss/koleo_loss.py`), the nearest neighbour is searched
within this rank's batch only (no all-gather), and DINOv2 applies it separately to each
global crop's CLS tokens, so two crops of one image are never each other's neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, *, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if x_BD.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs at least 2 vectors per batch, got {x_BD.shape[0]}: "
                "train with a per-rank batch size of 2 or more"
            )
        # float32: the log of small distances is unreliable in bf16/fp16
        x_BD = F.normalize(x_BD.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            dots_BB = x_BD @ x_BD.T
            dots_BB.fill_diagonal_(-2.0)  # below any cosine: a point is not its own neighbour
            nn_B = dots_BB.argmax(dim=1)
        # eps inside the sqrt keeps the gradient finite for identical vectors (the official
        # PairwiseDistance adds eps to the difference for the same reason)
        dist_B = ((x_BD - x_BD[nn_B]).pow(2).sum(dim=-1) + self.eps**2).sqrt()
        return -torch.log(dist_B + self.eps).mean()
