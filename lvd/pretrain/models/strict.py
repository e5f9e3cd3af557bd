"""Strict state-dict loading that names every offending key at once."""

from __future__ import annotations

import torch
from torch import nn


class StateDictMismatch(ValueError):
    """A state dict does not fit a model: missing keys, unexpected keys or wrong shapes."""


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise `StateDictMismatch` listing all missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if wrong_shape:
        problems.append(f"wrong shapes: {wrong_shape}")
    if problems:
        raise StateDictMismatch(f"{source} does not fit the model; " + "; ".join(problems))


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    check_state_dict(model, state_dict, source=source)
    model.load_state_dict(state_dict, strict=True)
