"""iBOT loss: cross-entropy from teacher to student on the masked patch tokens only.

Inputs are the M masked tokens of all global crops (gathered with `Batch.mask_indices`).
As in the official `iBOTPatchLoss.forward_masked`, each masked token is weighted by
1/(number of masked tokens of its crop) (`Batch.mask_weights`), so every masked crop
counts once, and the sum is divided by the number of global crops in the batch
*including the unmasked ones* (official: `student_masks_flat.shape[0]`).

The centre is the EMA of the mean teacher logits over all masked tokens of all ranks.
The official averages per-rank means instead; the two agree when ranks mask the same
number of tokens. Sinkhorn uses the global masked-token count as B, like the official.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvd.pretrain.losses.centering import CenteredTeacher


class iBOTPatchLoss(CenteredTeacher):  # noqa: N801 (the paper's spelling)
    def forward(
        self,
        student_logits_MK: torch.Tensor,
        teacher_probs_MK: torch.Tensor,
        mask_weights_M: torch.Tensor,
        n_crops: int,
    ) -> torch.Tensor:
        """sum_m w_m * H(teacher_m, student_m) / n_crops."""
        if student_logits_MK.shape != teacher_probs_MK.shape:
            raise ValueError(
                f"student {tuple(student_logits_MK.shape)} and teacher {tuple(teacher_probs_MK.shape)} differ"
            )
        if mask_weights_M.shape != student_logits_MK.shape[:1]:
            raise ValueError(f"mask_weights {tuple(mask_weights_M.shape)}: need one weight per masked token")
        if n_crops < 1:
            raise ValueError(f"n_crops={n_crops}: pass the number of global crops in the batch (G*B)")
        lsm_MK = F.log_softmax(student_logits_MK.float() / self.student_temp, dim=-1)
        ce_M = -(teacher_probs_MK * lsm_MK).sum(dim=-1)
        return (ce_M * mask_weights_M).sum() / n_crops
