"""AdamW parameter groups for DINOv2: layer-wise lr decay, no decay on 1-d/token params.

Each parameter gets an lr multiplier (layer-wise decay `d ** (depth + 1 - layer)`, times 0.2
for the patch embedding), a weight-decay multiplier (0 for biases, norms, LayerScale gammas,
position embedding, cls / register / mask tokens) and a flag for the prototype ("last")
layer of the heads, whose lr follows its own schedule (zero for the first epoch).
Parameters with equal settings share one group, so the optimizer stays fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lvd.pretrain.parallel import full_tensor

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_TOKENS = ("pos_embed", "cls_token", "register_tokens", "mask_token")
_EMBED = ("pos_embed", "cls_token", "register_tokens", "mask_token", "patch_embed")


@dataclass(frozen=True)
class ParamSettings:
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the rest (final norm, heads)."""
    if any(tok in name for tok in _EMBED):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_settings(
    name: str,
    param: nn.Parameter,
    *,
    depth: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    in_backbone: bool,
) -> ParamSettings:
    lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth)) if in_backbone else 1.0
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    no_decay = (
        name.endswith("bias")
        or param.ndim <= 1
        or "norm" in name
        or "gamma" in name
        or any(tok in name for tok in _TOKENS)
    )
    return ParamSettings(lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name)


def param_groups(
    modules: dict[str, nn.Module],
    *,
    depth: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict]:
    """Groups for `torch.optim.AdamW` over named modules; "backbone" gets layer-wise decay.

    Each group carries `lr_multiplier`, `wd_multiplier` and `is_last_layer`; call
    `apply_schedules` every step to set its `lr` and `weight_decay`.
    """
    grouped: dict[ParamSettings, list[nn.Parameter]] = {}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            s = param_settings(
                name,
                p,
                depth=depth,
                layerwise_decay=layerwise_decay,
                patch_embed_lr_mult=patch_embed_lr_mult,
                in_backbone=prefix == "backbone",
            )
            grouped.setdefault(s, []).append(p)
    return [
        {
            "params": ps,
            "lr_multiplier": s.lr_multiplier,
            "wd_multiplier": s.wd_multiplier,
            "is_last_layer": s.is_last_layer,
        }
        for s, ps in sorted(
            grouped.items(), key=lambda kv: (kv[0].is_last_layer, -kv[0].lr_multiplier, kv[0].wd_multiplier)
        )
    ]


def build_adamw(groups: list[dict], *, beta1: float, beta2: float) -> torch.optim.AdamW:
    # lr and weight decay are set per step by apply_schedules; foreach keeps CPU steps fast.
    return torch.optim.AdamW(groups, lr=0.0, betas=(beta1, beta2), weight_decay=0.0)


def apply_schedules(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    weight_decay: float,
    last_layer_lr: float,
) -> None:
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        g["weight_decay"] = weight_decay * g["wd_multiplier"]


def zero_last_layer_grads(optimizer: torch.optim.Optimizer) -> None:
    """While the prototypes are frozen, drop their grads so they don't count in clipping."""
    for g in optimizer.param_groups:
        if g["is_last_layer"] and g["lr"] == 0.0:
            for p in g["params"]:
                p.grad = None


def clip_gradients(modules: dict[str, nn.Module], max_norm: float) -> dict[str, float]:
    """Clip each module's gradient norm separately (as DINOv2 does); return the norms."""
    norms = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            # DTensor grads (FSDP2): the norm is over the whole gradient; read it in full
            norms[name] = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    return norms


def build_student_optimizer(student: dict[str, nn.Module], optim) -> torch.optim.AdamW:
    """AdamW over a MetaArch's student (backbone + heads) with the recipe's `OptimConfig`:
    layer-wise lr decay over the backbone's blocks, patch-embed lr multiplier, no weight
    decay on biases/norms/LayerScale/tokens (see `param_settings`)."""
    groups = param_groups(
        student,
        depth=len(student["backbone"].blocks),
        layerwise_decay=optim.layerwise_decay,
        patch_embed_lr_mult=optim.patch_embed_lr_mult,
    )
    return build_adamw(groups, beta1=optim.beta1, beta2=optim.beta2)
