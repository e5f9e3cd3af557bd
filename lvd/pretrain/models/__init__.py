"""DINOv2 backbones: the ViT, and loaders for official, Hugging Face and lvd weights."""

from lvd.pretrain.models.vit import (
    ARCHITECTURES,
    BackboneOutput,
    VisionTransformer,
    ViTConfig,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "BackboneOutput",
    "VisionTransformer",
    "ViTConfig",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
