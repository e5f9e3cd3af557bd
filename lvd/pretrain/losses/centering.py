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

from lvd.pretrain.losses.sinkhorn import sinkhorn_knopp


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
    """What the DINO and iBOT losses share: the student temperature, the `center` buffer
    [1, K] (saved in state_dict for exact resume) and the two ways of centring the teacher."""

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp={student_temp}: must be positive (DINOv2 uses 0.1)")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum={center_momentum}: must be in [0, 1] (DINOv2 uses 0.9)")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits_NK: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp teacher probabilities [N, K] over the rows of all ranks (all ranks
        call it together)."""
        return sinkhorn_knopp(teacher_logits_NK, teacher_temp, n_iterations)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits_NK: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities [N, K]: softmax((logits - centre) / teacher_temp)."""
        return F.softmax((teacher_logits_NK.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits_NK: torch.Tensor) -> None:
        """EMA update with this step's teacher logits (all ranks must call it together)."""
        m = self.center_momentum
        self.center.mul_(m).add_(global_mean(teacher_logits_NK), alpha=1.0 - m)
