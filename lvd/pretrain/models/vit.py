"""DINOv2 Vision Transformer: patch 14, learned position embeddings, registers, LayerScale.

Parameter names match facebookresearch/dinov2's `DinoVisionTransformer` with flat blocks
(`cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.N.*`,
`norm`), so official torch-hub weights load without renaming. `blocks` stays a plain
`nn.ModuleList` of `Block`s so the trainer can `fully_shard` each one; no FSDP code lives here.

Position embeddings: learned for the native grid (`img_size // patch_size`), bicubically resized
for other sizes. We follow the official DINOv2 `interpolate_pos_encoding`: the native grid is
returned untouched, and otherwise F.interpolate runs with `scale_factor=(h + offset) / M` when
`interpolate_offset` > 0 (the dino issue #8 trick that keeps float error from shrinking the
output by one) or with `size=(h, w)` when it is 0. Defaults (offset 0.1, no antialias) are the
official training defaults; official register checkpoints and Hugging Face use offset 0 (HF
Dinov2WithRegisters and official reg models also antialias), and the loaders set that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.models.layers import LAYER_NORM_EPS, Block, LayerScale, Mlp, SwiGLUFFN, swiglu_hidden_dim

FFN_KINDS = ("mlp", "swiglu")


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Everything needed to rebuild a `VisionTransformer` (saved beside checkpoints/exports)."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    num_register_tokens: int = 0
    layerscale_init: float | None = 1e-5
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    qkv_bias: bool = True
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r}: choose one of {FFN_KINDS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.num_register_tokens < 0 or self.depth < 1:
            raise ValueError("num_register_tokens must be >= 0 and depth >= 1")

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn == "swiglu":
            return swiglu_hidden_dim(self.embed_dim, self.mlp_ratio)
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(frozen=True)
class BackboneOutput:
    """Final-norm CLS, register and patch tokens, plus the CLS before the final norm."""

    cls_BD: torch.Tensor
    registers_BRD: torch.Tensor
    patches_BND: torch.Tensor
    cls_prenorm_BD: torch.Tensor


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, **config) -> None:
        super().__init__()
        cfg = self.config = ViTConfig(**config)
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_register_tokens = cfg.num_register_tokens
        self.native_grid = cfg.img_size // cfg.patch_size
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.native_grid**2, D))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))
        else:
            self.register_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.blocks = nn.ModuleList(self._make_block(i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=LAYER_NORM_EPS)
        self.init_weights()

    @classmethod
    def from_config(cls, config: ViTConfig) -> VisionTransformer:
        return cls(**asdict(config))

    def _make_block(self, index: int) -> Block:
        cfg = self.config
        rate = cfg.drop_path_rate
        if not cfg.drop_path_uniform and cfg.depth > 1:
            rate = rate * index / (cfg.depth - 1)  # official linear decay rule, 0 at block 0
        ffn_cls = SwiGLUFFN if cfg.ffn == "swiglu" else Mlp
        return Block(
            dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            ffn=ffn_cls(cfg.embed_dim, cfg.ffn_hidden_dim),
            layerscale_init=cfg.layerscale_init,
            drop_path_rate=rate,
            qkv_bias=cfg.qkv_bias,
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: trunc-normal(0.02) linears and pos_embed, tiny CLS/registers, zero
        mask token. Callable again after `to_empty()` when the model was built on meta."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.Conv2d, LayerScale)):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)

    def patch_grid(self, x_BCHW: torch.Tensor) -> tuple[int, int]:
        H, W = x_BCHW.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} must be a multiple of patch_size={self.patch_size}")
        return H // self.patch_size, W // self.patch_size

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + h*w, D) for an h x w patch grid; see the module docstring."""
        M = self.native_grid
        if (h, w) == (M, M):
            return self.pos_embed
        pos_1TD = self.pos_embed.float()
        grid_1DMM = pos_1TD[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            size_kw = {"scale_factor": ((h + offset) / M, (w + offset) / M)}
        else:
            size_kw = {"size": (h, w)}
        antialias = self.config.interpolate_antialias
        grid_1Dhw = F.interpolate(grid_1DMM, mode="bicubic", antialias=antialias, **size_kw)
        assert grid_1Dhw.shape[-2:] == (h, w), f"interpolated to {tuple(grid_1Dhw.shape[-2:])}, wanted {(h, w)}"
        patches_1ND = grid_1Dhw.flatten(2).transpose(1, 2)
        return torch.cat([pos_1TD[:, :1], patches_1ND], dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, x_BCHW: torch.Tensor, masks_BN: torch.Tensor | None = None) -> torch.Tensor:
        """[CLS, registers, patches] with masked patches replaced by `mask_token` before the
        position embedding is added (registers get none), as in the official code."""
        h, w = self.patch_grid(x_BCHW)
        x_BND = self.patch_embed(x_BCHW)
        B, N, _ = x_BND.shape
        if masks_BN is not None:
            if masks_BN.shape != (B, N) or masks_BN.dtype != torch.bool:
                got = f"{masks_BN.dtype} {tuple(masks_BN.shape)}"
                raise ValueError(f"masks_BN must be bool of shape {(B, N)} (one flag per patch), got {got}")
            x_BND = torch.where(masks_BN.unsqueeze(-1), self.mask_token.to(x_BND.dtype), x_BND)
        x_BTD = torch.cat([self.cls_token.expand(B, -1, -1), x_BND], dim=1)
        x_BTD = x_BTD + self.interpolate_pos_embed(h, w)
        if self.register_tokens is not None:
            x_BTD = torch.cat([x_BTD[:, :1], self.register_tokens.expand(B, -1, -1), x_BTD[:, 1:]], dim=1)
        return x_BTD

    def forward(self, x_BCHW: torch.Tensor, masks_BN: torch.Tensor | None = None) -> BackboneOutput:
        x_BTD = self.prepare_tokens(x_BCHW, masks_BN)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        normed_BTD = self.norm(x_BTD)
        R = self.num_register_tokens
        return BackboneOutput(
            cls_BD=normed_BTD[:, 0],
            registers_BRD=normed_BTD[:, 1 : 1 + R],
            patches_BND=normed_BTD[:, 1 + R :],
            cls_prenorm_BD=x_BTD[:, 0],
        )

    @torch.no_grad()
    def last_self_attention(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, heads, T, T) of the last block; tokens are [CLS, registers, patches].

        Not `forward`, so FSDP hooks do not run: call it on an unsharded model (e.g. the
        teacher from `load_backbone`), as the picture writers do."""
        x_BTD = self.prepare_tokens(x_BCHW)
        for block in self.blocks[:-1]:
            x_BTD = block(x_BTD)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(x_BTD))


def vit_tiny(**overrides) -> VisionTransformer:
    """192 wide, 6 deep: trains on a couple of CPU cores (the `tiny` recipe)."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 6, "num_heads": 3, **overrides})


def vit_small(**overrides) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **overrides})


def vit_base(**overrides) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **overrides})


def vit_large(**overrides) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **overrides})


def vit_giant2(**overrides) -> VisionTransformer:
    """The official ViT-g: 1536 wide, 40 deep, 24 heads of 64, fused SwiGLU with hidden 4096."""
    return VisionTransformer(**{"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn": "swiglu", **overrides})


ARCHITECTURES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}
