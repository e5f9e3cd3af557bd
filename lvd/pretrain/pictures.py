"""Pictures of what a backbone learned: patch-feature PCA and CLS attention maps.

PCA: the patch features of all given images are projected on their first 3 principal
components, which are shown as RGB (similar parts of objects get similar colours once
training works). Attention: the last block's CLS-to-patch attention, averaged over heads.
Each picture is one row per image: [input | PCA | attention], written as PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.pretrain.knn import IMAGENET_MEAN, IMAGENET_STD


def minmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


@torch.no_grad()
def patch_pca_rgb(backbone: torch.nn.Module, x_B3HW: torch.Tensor) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1]: first 3 principal components of the patch features."""
    h, w = backbone.patch_grid(x_B3HW)
    patches_BND = backbone(x_B3HW).patches_BND.float()
    proj_P3 = pca_project(patches_BND.flatten(0, 1), 3)
    rgb_B3hw = proj_P3.reshape(x_B3HW.shape[0], h, w, 3).permute(0, 3, 1, 2)
    return minmax(rgb_B3hw, (0, 2, 3))  # one scale per component, shared by all images


def pca_project(x_PD: torch.Tensor, k: int) -> torch.Tensor:
    """[P, k]: the rows of x_PD, centred, projected on their first k principal components."""
    x_PD = x_PD - x_PD.mean(0, keepdim=True)
    _, _, v_DD = torch.linalg.svd(x_PD, full_matrices=False)
    return x_PD @ v_DD[:k].T


@torch.no_grad()
def cls_attention_heads(backbone: torch.nn.Module, x_B3HW: torch.Tensor) -> torch.Tensor:
    """[B, heads, h, w]: last-block attention of CLS to each patch (softmax weights; the
    registers' share is left out, so a head's map sums to at most 1)."""
    h, w = backbone.patch_grid(x_B3HW)
    attn_BHTT = backbone.last_self_attention(x_B3HW).float()
    first_patch = 1 + backbone.num_register_tokens
    cls_BHN = attn_BHTT[:, :, 0, first_patch:]
    return cls_BHN.reshape(*cls_BHN.shape[:2], h, w)


@torch.no_grad()
def cls_attention(backbone: torch.nn.Module, x_B3HW: torch.Tensor) -> torch.Tensor:
    """[B, h, w] in [0, 1]: last-block CLS attention to each patch, mean over heads."""
    return minmax(cls_attention_heads(backbone, x_B3HW).mean(1), (1, 2))


def heat(a_BHW: torch.Tensor) -> torch.Tensor:
    """A black-red-yellow-white colour map: [B, 3, H, W]."""
    return torch.stack([(3 * a_BHW).clamp(0, 1), (3 * a_BHW - 1).clamp(0, 1), (3 * a_BHW - 2).clamp(0, 1)], dim=1)


def denormalise(x_B3HW: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x_B3HW.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x_B3HW.device)[:, None, None]
    return (x_B3HW.float() * std + mean).clamp(0, 1)


def image_grid(columns: list[torch.Tensor]) -> Image.Image:
    """Columns of [B, 3, H, W] images side by side, one row per image."""
    rows = torch.cat([torch.cat(list(c.cpu()), dim=1) for c in columns], dim=2)  # [3, B*H, k*W]
    return Image.fromarray((rows.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def write_pictures(backbone: torch.nn.Module, x_B3HW: torch.Tensor, out_dir: str | Path, tag: str) -> Path:
    """Write OUT_DIR/TAG.png: rows of [image | patch PCA | CLS attention]; returns the path."""
    was_training = backbone.training
    backbone.eval()
    size = x_B3HW.shape[-2:]
    pca = F.interpolate(patch_pca_rgb(backbone, x_B3HW), size=size, mode="nearest")
    attn = F.interpolate(heat(cls_attention(backbone, x_B3HW)), size=size, mode="nearest")
    backbone.train(was_training)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}.png"
    image_grid([denormalise(x_B3HW), pca, attn]).save(path)
    return path
