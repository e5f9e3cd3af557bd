"""Transformer block parts for the DINOv2 ViT.

Module and parameter names mirror facebookresearch/dinov2 (`dinov2/layers/*`): `attn.qkv`,
`attn.proj`, `ls1.gamma`, `mlp.fc1`/`mlp.fc2` or `mlp.w12`/`mlp.w3`, so official torch-hub
state dicts map onto ours key for key. Attention runs through `F.scaled_dot_product_attention`
(flash / memory-efficient kernels on GPU, fused kernel on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6  # official DINOv2 and HF Dinov2 both use 1e-6


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden size of the official fused SwiGLU: 2/3 of the MLP size, rounded up to a multiple
    of 8 (ViT-g: 1536 * 4 * 2/3 = 4096)."""
    return (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        qkv_3BHTd = self.qkv(x_BTD).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q_BHTd, k_BHTd, v_BHTd = qkv_3BHTd.unbind(0)
        return q_BHTd, k_BHTd, v_BHTd

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BHTd, k_BHTd, v_BHTd = self._qkv(x_BTD)
        out_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd)
        return self.proj(out_BHTd.transpose(1, 2).reshape(B, T, D))

    def attention_weights(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix, computed explicitly (SDPA never materialises it)."""
        q_BHTd, k_BHTd, _ = self._qkv(x_BTD)
        scale = q_BHTd.shape[-1] ** -0.5
        return torch.softmax((q_BHTd * scale) @ k_BHTd.transpose(-2, -1), dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BTD)))


class SwiGLUFFN(nn.Module):
    """The official "swiglufused" FFN: one w12 projection split into gate and value halves."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate_BTF, value_BTF = self.w12(x_BTD).chunk(2, dim=-1)
        return self.w3(F.silu(gate_BTF) * value_BTF)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD * self.gamma


def drop_path(x_BTD: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x_BTD
    keep = 1.0 - rate
    mask_B11 = x_BTD.new_empty((x_BTD.shape[0], 1, 1)).bernoulli_(keep)
    return x_BTD * mask_B11.div_(keep)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(ls1(attn(norm1 x))), then the same with the FFN."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        layerscale_init: float | None,
        drop_path_rate: float,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ffn
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = self._add_branch(x_BTD, self.attn(self.norm1(x_BTD)), self.ls1)
        return self._add_branch(x_BTD, self.mlp(self.norm2(x_BTD)), self.ls2)

    def _add_branch(self, x_BTD: torch.Tensor, y_BTD: torch.Tensor, ls: nn.Module) -> torch.Tensor:
        if self.training and self.drop_path_rate > 0.0:
            return x_BTD + drop_path(ls(y_BTD), self.drop_path_rate, training=True)
        if isinstance(ls, LayerScale):  # one fused x + gamma * y instead of a mul and an add
            return torch.addcmul(x_BTD, y_BTD, ls.gamma)
        return x_BTD + y_BTD
