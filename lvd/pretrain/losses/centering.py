"""Teacher centring shared by the DINO and iBOT losses: an EMA of the teacher's mean logits.

The batch mean is taken over all rows on all ranks (sum and count all-reduced), so every
rank holds the same centre. The official code all-reduces the sum asynchronously and
applies it at the next step; we reduce synchronously, which gives the same centre as long
as the caller centres the teacher before updating (the official order, and ours).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def global_mean(x_NK: torch.Tensor) -> torch.Tensor:
    """Mean over rows of all ranks, [1, K] float32."""
    sum_1K = x_NK.float().sum(dim=0, keepdim=True)
    count = torch.tensor([x_NK.shape[0]], dtype=torch.float32, device=x_NK.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sum_1K)
        dist.all_reduce(count)
    return sum_1K / count.clamp(min=1.0)


class CenteredTeacher(nn.Module):
    """Holds the `center` buffer [1, K] (saved in state_dict for exact resume)."""

    def __init__(self, out_dim: int, *, center_momentum: float) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum={center_momentum}: must be in [0, 1] (DINOv2 uses 0.9)")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits_NK: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities [N, K]: softmax((logits - centre) / teacher_temp)."""
        return F.softmax((teacher_logits_NK.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits_NK: torch.Tensor) -> None:
        """EMA update with this step's teacher logits (all ranks must call it together)."""
        m = self.center_momentum
        self.center.mul_(m).add_(global_mean(teacher_logits_NK), alpha=1.0 - m)
