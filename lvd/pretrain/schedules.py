"""Training schedules, computed up front as arrays indexed by iteration (as in DINOv2).

Every value the loop changes per step (learning rate, weight decay, EMA momentum, teacher
temperature, prototype-layer learning rate) is one float64 array of length `total_iters`.
Arrays make resume trivial (index by the restored step) and are easy to plot and test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine(start: float, end: float, n: int) -> np.ndarray:
    """`n` values going from `start` (i=0) towards `end` along half a cosine."""
    if n <= 0:
        return np.zeros(0)
    i = np.arange(n)
    return end + 0.5 * (start - end) * (1 + np.cos(math.pi * i / n))


def linear(start: float, end: float, n: int) -> np.ndarray:
    """`n` values from `start` (i=0) towards `end`, excluding `end` (it is the next phase)."""
    return np.linspace(start, end, n, endpoint=False) if n > 0 else np.zeros(0)


def warmup_cosine(
    *,
    peak: float,
    final: float,
    total: int,
    warmup: int = 0,
    warmup_start: float = 0.0,
    freeze: int = 0,
) -> np.ndarray:
    """`freeze` zeros, a linear warmup to `peak`, then cosine to `final`; `total` values."""
    freeze, warmup = min(freeze, total), min(warmup, max(total - freeze, 0))
    rest = total - freeze - warmup
    return np.concatenate([np.zeros(freeze), linear(warmup_start, peak, warmup), cosine(peak, final, rest)])


def warmup_constant(*, start: float, value: float, total: int, warmup: int) -> np.ndarray:
    """A linear warmup from `start` to `value` over `warmup` steps, then `value`."""
    warmup = min(warmup, total)
    return np.concatenate([linear(start, value, warmup), np.full(total - warmup, value)])


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """DINOv2's `sqrt_wrt_1024` rule: the peak lr grows with sqrt(global batch / 1024)."""
    return base_lr * math.sqrt(batch_size / 1024)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    total_iters: int
    epoch_length: int
    global_batch_size: int
    # No defaults: the values live once, in the recipe (`Recipe.schedule_config` builds this).
    base_lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup_epochs: float
    freeze_last_layer_epochs: float

    def __post_init__(self) -> None:
        if self.total_iters < 1 or self.epoch_length < 1:
            raise ValueError(
                f"total_iters ({self.total_iters}) and epoch_length ({self.epoch_length}) "
                "must be >= 1; raise the recipe's epochs or epoch_length"
            )
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")

    def iters(self, epochs: float) -> int:
        return int(round(epochs * self.epoch_length))


@dataclass(frozen=True)
class ScheduleValues:
    """The schedules' values at one step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> ScheduleValues:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} is outside the schedules' {len(self)} iterations")
        return ScheduleValues(
            lr=float(self.lr[step]),
            weight_decay=float(self.weight_decay[step]),
            momentum=float(self.momentum[step]),
            teacher_temp=float(self.teacher_temp[step]),
            last_layer_lr=float(self.last_layer_lr[step]),
        )


def build_schedules(cfg: ScheduleConfig) -> Schedules:
    total, peak = cfg.total_iters, scaled_lr(cfg.base_lr, cfg.global_batch_size)
    warmup = cfg.iters(cfg.warmup_epochs)
    lr = warmup_cosine(peak=peak, final=cfg.min_lr, total=total, warmup=warmup)
    # The prototype layer follows the lr schedule but stays frozen for the first epoch(s):
    # letting it move while the backbone is random makes DINO collapse early.
    last_layer_lr = lr.copy()
    last_layer_lr[: cfg.iters(cfg.freeze_last_layer_epochs)] = 0.0
    return Schedules(
        lr=lr,
        weight_decay=cosine(cfg.weight_decay, cfg.weight_decay_end, total),
        momentum=cosine(cfg.momentum, cfg.momentum_end, total),
        teacher_temp=warmup_constant(
            start=cfg.teacher_temp_start,
            value=cfg.teacher_temp,
            total=total,
            warmup=cfg.iters(cfg.teacher_temp_warmup_epochs),
        ),
        last_layer_lr=last_layer_lr,
    )
