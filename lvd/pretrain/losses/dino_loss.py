"""DINO loss on CLS tokens: cross-entropy from teacher to student over crop pairs.

Pairing follows the official DINOv2 training step (`dinov2/train/ssl_meta_arch.py`): the
teacher sees only the G global crops; every student crop (global and local) is compared
with every teacher crop except its own view (student global crop g is never compared with
teacher global crop g). The official code hard-codes G=2 by swapping the two teacher
chunks; we exclude the diagonal for any G. Each pair's loss is a mean over images and
the total is the mean over the G*(G-1) + L*G pairs, which equals the official
normalisation `... / (n_global_crops_loss_terms + n_local_crops_loss_terms)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvd.pretrain.losses.centering import CenteredTeacher


class DINOLoss(CenteredTeacher):
    def forward(
        self,
        student_global_GBK: torch.Tensor,
        student_local_LBK: torch.Tensor | None,
        teacher_probs_GBK: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over crop pairs of the per-image cross-entropy H(teacher, student).

        Inputs are crop-major: `x.view(n_crops, B, K)` of the [n_crops*B, K] head output.
        """
        n_global = teacher_probs_GBK.shape[0]
        n_local = 0 if student_local_LBK is None else student_local_LBK.shape[0]
        if student_global_GBK.shape != teacher_probs_GBK.shape:
            raise ValueError(
                f"student global {tuple(student_global_GBK.shape)} and teacher "
                f"{tuple(teacher_probs_GBK.shape)} must both be [G, B, K]"
            )
        n_pairs = n_global * (n_global - 1) + n_local * n_global
        if n_pairs == 0:
            raise ValueError("no crop pairs: use 2+ global crops or add local crops")
        t_sum_BK = teacher_probs_GBK.sum(dim=0)
        # sum over teachers t != g of H(t, s_g) = -<sum_t t - t_g, log s_g>
        lsm_GBK = F.log_softmax(student_global_GBK.float() / self.student_temp, dim=-1)
        total = -((t_sum_BK - teacher_probs_GBK) * lsm_GBK).sum(dim=-1).mean(dim=1).sum()
        if n_local:
            lsm_LBK = F.log_softmax(student_local_LBK.float() / self.student_temp, dim=-1)
            total = total - (t_sum_BK * lsm_LBK).sum(dim=-1).mean(dim=1).sum()
        return total / n_pairs
