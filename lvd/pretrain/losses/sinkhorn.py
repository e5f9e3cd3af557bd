"""Sinkhorn-Knopp teacher assignments, computed in log space.

The official DINOv2 (`dinov2/loss/dino_clstoken_loss.py`) computes `exp(logits / temp)`
directly, which overflows float32 to inf (then NaN) once `logits / temp` exceeds ~88, e.g.
logits above 3.5 at the usual teacher temperature 0.04. We run the same iterations on
`log Q` with log-sum-exp normalisations, so any finite logits give finite assignments.

Normalisation (same as official): Q is [B, K] over all B rows on all ranks; each iteration
first makes every prototype column sum to 1/K, then every row sum to 1/B; the result is
scaled by B so each row is a probability distribution over the K prototypes. After the
last iteration rows sum to exactly 1 and prototype columns are approximately B/K.
The official first divides Q by its global sum; in log space that constant shift is
removed by the first column normalisation, so we skip it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_row_count(n_rows: int, device: torch.device) -> int:
    """Number of rows summed over all ranks (ranks may hold different counts)."""
    if not _dist_on():
        return n_rows
    count = torch.tensor([n_rows], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def _logsumexp_over_rows(log_q_BK: torch.Tensor) -> torch.Tensor:
    """log of the column sums over dim 0, summed across ranks; shape [1, K]."""
    m_1K = log_q_BK.amax(dim=0, keepdim=True)
    if _dist_on():
        dist.all_reduce(m_1K, op=dist.ReduceOp.MAX)
    # A column that is -inf everywhere stays -inf; keep exp() finite for it.
    m_1K = torch.where(torch.isfinite(m_1K), m_1K, torch.zeros_like(m_1K))
    s_1K = torch.exp(log_q_BK - m_1K).sum(dim=0, keepdim=True)
    if _dist_on():
        dist.all_reduce(s_1K)
    return m_1K + torch.log(s_1K)


@torch.no_grad()
def sinkhorn_knopp(logits_BK: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments [B, K] (rows sum to 1) of this rank's B rows.

    Column sums are all-reduced when torch.distributed is initialised, so every rank must
    call this collectively; B in the row normalisation is the global row count.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations={n_iterations}: use at least 1 Sinkhorn iteration")
    log_q_BK = logits_BK.float() / temp
    n_rows = global_row_count(log_q_BK.shape[0], log_q_BK.device)
    n_protos = log_q_BK.shape[1]
    for _ in range(n_iterations):
        # each prototype (column) gets total mass 1/K ...
        log_q_BK = log_q_BK - _logsumexp_over_rows(log_q_BK) - math.log(n_protos)
        # ... then each sample (row, local to its rank) gets total mass 1/B
        log_q_BK = log_q_BK - torch.logsumexp(log_q_BK, dim=1, keepdim=True) - math.log(n_rows)
    return torch.exp(log_q_BK + math.log(n_rows))
