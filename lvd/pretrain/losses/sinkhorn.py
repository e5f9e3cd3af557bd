"""Sinkhorn-Knopp teacher assignments that never overflow.

The official DINOv2 (`dinov2/loss/dino_clstoken_loss.py`) computes `exp(logits / temp)`
directly, which overflows float32 to inf (then NaN) once `logits / temp` exceeds ~88, e.g.
logits above 3.5 at the usual teacher temperature 0.04. We subtract each prototype
column's maximum (over all ranks) before exponentiating: the first step of every
iteration normalises columns, which cancels any per-column factor exactly, so the result
equals the official one. Entries can still underflow to 0; if a whole row does (a sample
far below every column's maximum), its normalisation is 0/0 and we redo the computation
in log space with log-sum-exp normalisations, which is exact but about 1.5-3x slower.

Normalisation (same as official): Q is [B, K] over all B rows on all ranks; each iteration
first makes every prototype column sum to 1/K, then every row sum to 1/B; the result is
scaled by B so each row is a probability distribution over the K prototypes. After the
last iteration rows sum to exactly 1 and prototype columns are approximately B/K.
(The official first divides Q by its global sum; the column step cancels that too.)
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


def _all_ranks_ok(q_BK: torch.Tensor) -> bool:
    ok = torch.isfinite(q_BK).all().float().reshape(1)
    if _dist_on():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank must take the same path
    return bool(ok.item())


def _max_shifted(log_q_BK: torch.Tensor, n_rows: int, n_iterations: int) -> torch.Tensor:
    m_1K = log_q_BK.amax(dim=0, keepdim=True)
    if _dist_on():
        dist.all_reduce(m_1K, op=dist.ReduceOp.MAX)
    q_BK = torch.exp(log_q_BK - m_1K)  # <= 1; each column's maximum is 1 on some rank
    n_protos = q_BK.shape[1]
    for _ in range(n_iterations):
        col_1K = q_BK.sum(dim=0, keepdim=True)
        if _dist_on():
            dist.all_reduce(col_1K)
        q_BK /= col_1K * n_protos  # each prototype (column) gets total mass 1/K ...
        q_BK /= q_BK.sum(dim=1, keepdim=True) * n_rows  # ... then each row 1/B
    return q_BK * n_rows


def _log_space(log_q_BK: torch.Tensor, n_rows: int, n_iterations: int) -> torch.Tensor:
    n_protos = log_q_BK.shape[1]
    for _ in range(n_iterations):
        log_q_BK = log_q_BK - _logsumexp_over_rows(log_q_BK) - math.log(n_protos)
        log_q_BK = log_q_BK - torch.logsumexp(log_q_BK, dim=1, keepdim=True) - math.log(n_rows)
    return torch.exp(log_q_BK + math.log(n_rows))


@torch.no_grad()
def sinkhorn_knopp(
    logits_BK: torch.Tensor, temp: float, n_iterations: int = 3, *, log_space: bool = False
) -> torch.Tensor:
    """Balanced soft assignments [B, K] (rows sum to 1) of this rank's B rows.

    Column sums are all-reduced when torch.distributed is initialised, so every rank must
    call this collectively; B in the row normalisation is the global row count.
    `log_space=True` skips the fast path (used by tests and the benchmark).
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations={n_iterations}: use at least 1 Sinkhorn iteration")
    log_q_BK = logits_BK.float() / temp
    n_rows = global_row_count(log_q_BK.shape[0], log_q_BK.device)
    if not log_space:
        q_BK = _max_shifted(log_q_BK, n_rows, n_iterations)
        if _all_ranks_ok(q_BK):
            return q_BK
    return _log_space(log_q_BK, n_rows, n_iterations)
