"""CLS and patch features of a DINOv2 backbone at any input size that is a multiple of its patch.

Two ways to prepare an image, both normalised with the ImageNet mean/std:
- `crop_pixels` (batched embedding): the DINOv2 evaluation transform, shorter side to `resize`
  (bicubic), centre `size` x `size` crop. It is `lvd.curation.embed.resize_crop`, so at the same
  sizes `lvd embed` sees exactly the pixels the curation embed stage sees.
- `full_pixels` (one image's patch map): the whole image, shorter side to `size`, longer side to
  the nearest multiple of the patch (aspect kept to within half a patch), no crop.

Position embeddings are interpolated by the backbone itself (`VisionTransformer.interpolate_pos_
embed`, as the checkpoint's origin does). Patch maps never contain the register tokens:
`BackboneOutput.patches_BND` starts after CLS and registers. Features are the final-norm tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvd.curation.embed import (
    DTYPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    autocast_dtype,
    resize_crop,
    resolve_device,
)
from lvd.curation.pixels import to_rgb
from lvd.pretrain.models.vit import VisionTransformer


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    size: int = 224  # side of the square crop fed to the backbone; a multiple of the patch (14)
    resize: int | None = None  # shorter side before the crop; None: round(size * 8 / 7) (256 -> 224)
    patches: bool = False  # also keep the patch-token map (h x w x D per image)
    batch_size: int = 32  # images per forward pass
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # autocast dtype; "auto": bfloat16 on cuda, float32 on cpu
    decode_threads: int = 4  # Pillow releases the GIL while decoding and resizing

    def __post_init__(self) -> None:
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(
                f"size={self.size}, resize={self.resize}: need 1 <= size <= resize (the crop comes from the resized image)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: use at least 1 image per forward pass")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose 'auto' or one of {sorted(DTYPES)}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads={self.decode_threads}: use at least 1")

    @property
    def resize_side(self) -> int:
        return self.resize if self.resize is not None else round(self.size * 8 / 7)


@dataclass(frozen=True)
class Features:
    """Features of a batch of images, in input order (float32, CPU)."""

    cls_BD: np.ndarray
    patches_BhwD: np.ndarray | None  # None when patches were not asked for


def patch_size(backbone: VisionTransformer) -> int:
    return int(backbone.patch_size)


def check_size(backbone: VisionTransformer, size: int) -> None:
    p = patch_size(backbone)
    if size % p or size < p:
        raise ValueError(
            f"size={size} is not a positive multiple of the backbone's patch size {p}: use e.g. {max(p, size // p * p)}"
        )


def load_model(spec: str | Path, *, device: str = "auto") -> VisionTransformer:
    """`load_backbone(spec)` (lvd checkpoint or run folder, official .pth, HF folder), frozen,
    in eval mode, on `device`."""
    from lvd.pretrain.models.load import load_backbone

    model = load_backbone(spec)
    return model.eval().requires_grad_(False).to(resolve_device(device))


def to_tensor(pixels_HWC: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, H, W]."""
    x = torch.from_numpy(np.array(pixels_HWC))  # a copy: Pillow arrays are read-only
    x = x.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def crop_pixels(image: Image.Image, cfg: FeatureConfig) -> np.ndarray:
    """uint8 [size, size, 3]: the evaluation transform (resize shorter side, centre crop)."""
    return resize_crop(to_rgb(image), cfg.resize_side, cfg.size)


def full_pixels(image: Image.Image, size: int, patch: int) -> np.ndarray:
    """uint8 [H, W, 3] of the whole image: shorter side `size`, longer side a multiple of `patch`."""
    image = to_rgb(image)
    w, h = image.size
    long_side = max(patch, round(max(w, h) * size / min(w, h) / patch) * patch)
    new = (size, long_side) if w <= h else (long_side, size)
    return np.asarray(image.resize(new, Image.Resampling.BICUBIC))


@torch.inference_mode()
def forward(
    backbone: VisionTransformer, x_BCHW: torch.Tensor, *, patches: bool = True, dtype: str = "auto"
) -> Features:
    """Final-norm CLS [B, D] and patch map [B, h, w, D] (registers excluded) of normalised pixels."""
    h, w = backbone.patch_grid(x_BCHW)
    device = next(backbone.parameters()).device
    amp = autocast_dtype(dtype, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
        out = backbone(x_BCHW.to(device))
    cls_BD = out.cls_BD.float().cpu().numpy()
    if not patches:
        return Features(cls_BD, None)
    patches_BhwD = out.patches_BND.float().reshape(len(x_BCHW), h, w, -1).cpu().numpy()
    return Features(cls_BD, patches_BhwD)


def patch_features(
    backbone: VisionTransformer, image: Image.Image, size: int, *, crop: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(cls_D, patches_hwD), float32 numpy, of one PIL image.

    The whole image goes in (shorter side `size`, a multiple of the patch; the longer side
    rounded to a multiple of the patch), so patch (i, j) covers rows i*p..(i+1)*p and columns
    j*p..(j+1)*p of `full_pixels(image, size, p)`. `crop=True` uses the square evaluation crop
    of `crop_pixels` instead (h = w = size / p)."""
    check_size(backbone, size)
    if crop:
        pixels = crop_pixels(image, FeatureConfig(size=size, resize=size))
    else:
        pixels = full_pixels(image, size, patch_size(backbone))
    feats = forward(backbone, to_tensor(pixels)[None])
    return feats.cls_BD[0], feats.patches_BhwD[0]


def extract_batch(backbone: VisionTransformer, images: list[Image.Image], cfg: FeatureConfig) -> Features:
    """Features of decoded images through the evaluation crop, `cfg.batch_size` at a time."""
    return extract_pixels(backbone, [crop_pixels(im, cfg) for im in images], cfg)


def extract_pixels(backbone: VisionTransformer, pixels: list[np.ndarray], cfg: FeatureConfig) -> Features:
    """Features of uint8 [size, size, 3] crops (`crop_pixels`), `cfg.batch_size` at a time."""
    check_size(backbone, cfg.size)
    parts = []
    for start in range(0, len(pixels), cfg.batch_size):
        x_BCHW = torch.stack([to_tensor(p) for p in pixels[start : start + cfg.batch_size]])
        parts.append(forward(backbone, x_BCHW, patches=cfg.patches, dtype=cfg.dtype))
    if not parts:
        side = cfg.size // patch_size(backbone)
        empty = np.zeros((0, side, side, backbone.embed_dim), np.float32) if cfg.patches else None
        return Features(np.zeros((0, backbone.embed_dim), np.float32), empty)
    cls_BD = np.concatenate([p.cls_BD for p in parts])
    patches = np.concatenate([p.patches_BhwD for p in parts]) if cfg.patches else None
    return Features(cls_BD, patches)
