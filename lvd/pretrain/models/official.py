"""Load official DINOv2 torch-hub weights (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`).

Our parameter names are the official ones (see `vit.py`), so loading is a strict key-for-key
copy. Two official layouts are accepted: the flat hub files (`blocks.N.attn.qkv.weight`) and the
block-chunked FSDP training layout (`blocks.C.N.attn.qkv.weight`, chunk C holding global block
N), which is flattened first. The architecture is read off the tensors, so users pass only the
file; the number of heads is not stored, and every official model uses 64-dim heads.
"""

from __future__ import annotations

import math
import re

import torch

from lvd.pretrain.models.layers import swiglu_hidden_dim
from lvd.pretrain.models.strict import StateDictMismatch, load_strict
from lvd.pretrain.models.vit import VisionTransformer, ViTConfig

OFFICIAL_HEAD_DIM = 64
_CHUNKED_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.(.*)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")


def is_official_layout(state_dict: dict) -> bool:
    """True when the keys look like an official DINOv2 backbone (flat or block-chunked)."""
    return all(k in state_dict for k in _REQUIRED) and any(k.startswith("blocks.") for k in state_dict)


def flatten_block_chunks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`blocks.C.N.rest` -> `blocks.N.rest` (official `block_chunks > 0` checkpoints)."""
    if not any(_CHUNKED_KEY.match(k) for k in state_dict):
        return dict(state_dict)
    return {_CHUNKED_KEY.sub(r"blocks.\1.\2", k): v for k, v in state_dict.items()}


def official_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> ViTConfig:
    """Infer the `ViTConfig` of an official checkpoint from its tensor shapes."""
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise StateDictMismatch(f"not an official DINOv2 backbone state dict: missing {missing}")
    sd = flatten_block_chunks(state_dict)
    D = sd["cls_token"].shape[-1]
    in_chans, patch = sd["patch_embed.proj.weight"].shape[1], sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if grid * grid != sd["pos_embed"].shape[1] - 1:
        raise StateDictMismatch(f"pos_embed {tuple(sd['pos_embed'].shape)} is not 1 + a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    ffn, mlp_ratio = _ffn_from_state_dict(sd, D)
    return ViTConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=D,
        depth=depth,
        num_heads=max(1, D // OFFICIAL_HEAD_DIM),
        mlp_ratio=mlp_ratio,
        ffn=ffn,
        num_register_tokens=registers,
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None,  # hub value; weights overwrite it
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        # the hub builds register models with antialias and no offset, the others with offset 0.1
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )


def _ffn_from_state_dict(sd: dict[str, torch.Tensor], D: int) -> tuple[str, float]:
    if "blocks.0.mlp.w12.weight" in sd:
        hidden = sd["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = hidden * 3 / 2 / D  # invert the 2/3 rule; check it survives the rounding to 8
        for candidate in (round(mlp_ratio), mlp_ratio):
            if swiglu_hidden_dim(D, candidate) == hidden:
                return "swiglu", float(candidate)
        raise StateDictMismatch(f"SwiGLU hidden size {hidden} matches no mlp_ratio for width {D}")
    if "blocks.0.mlp.fc1.weight" in sd:
        return "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0] / D
    raise StateDictMismatch("no blocks.0.mlp.fc1 or blocks.0.mlp.w12 weight: unknown FFN")


def load_official_state_dict(model: VisionTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an official state dict into `model`; every key must be used and every shape match."""
    load_strict(model, flatten_block_chunks(state_dict), source="official DINOv2 state dict")


def build_official(state_dict: dict[str, torch.Tensor]) -> VisionTransformer:
    """A `VisionTransformer` shaped like the checkpoint, with its weights loaded."""
    model = VisionTransformer.from_config(official_config_from_state_dict(state_dict))
    load_official_state_dict(model, state_dict)
    return model
