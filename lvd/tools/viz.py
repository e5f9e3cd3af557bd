"""What a backbone sees in one image: CLS attention maps and a foreground PCA of patch features.

`patch_maps(backbone, image, size=...)` resizes the image as `features.full_pixels` does
(shorter side `size`, longer side to the nearest multiple of the patch size, no crop, so every
pixel is seen; position embeddings are interpolated by the model), runs it once and returns
`PatchMaps` on the h x w patch grid:
- the last block's CLS-to-patch attention of every head (softmax weights; registers excluded);
- the first principal component of the patch features, which in DINO-trained models separates
  object from background; patches above `threshold` (in standard deviations) are foreground.
  The component's sign is arbitrary, so we orient it to make the image border mostly background;
- the first three principal components of the foreground patches alone, as RGB (background
  black), the DINOv2 paper's picture.
`render_maps` lays them out side by side; `lvd viz` writes that PNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.pretrain.pictures import cls_attention_heads, heat, minmax, pca_project
from lvd.tools.features import check_size, full_pixels, patch_size, to_tensor

HEADS_PER_ROW = 4


@dataclass(frozen=True)
class PatchMaps:
    """One image's maps on its h x w patch grid (numpy, float32 unless said)."""

    image: Image.Image  # the resized RGB input the model saw (H = h * patch, W = w * patch)
    attention_Khw: np.ndarray  # CLS attention of each of the K heads
    first_component_hw: np.ndarray  # first PCA component in standard deviations, oriented
    foreground_hw: np.ndarray  # bool: first_component_hw > threshold
    pca_rgb_hw3: np.ndarray  # in [0, 1]; foreground PCA as RGB, background 0


def oriented_first_component(patches_hwD: torch.Tensor) -> torch.Tensor:
    """[h, w]: first PCA component in units of its standard deviation, signed so that the
    border patches average below the inner ones (the border is mostly background)."""
    h, w, D = patches_hwD.shape
    first_hw = pca_project(patches_hwD.reshape(h * w, D).float(), 1).reshape(h, w)
    first_hw = first_hw / first_hw.std().clamp_min(1e-8)
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if h > 2 and w > 2 and first_hw[border].mean() > first_hw[~border].mean():
        first_hw = -first_hw
    return first_hw


def foreground_pca_rgb(patches_hwD: torch.Tensor, foreground_hw: torch.Tensor) -> torch.Tensor:
    """[h, w, 3] in [0, 1]: first 3 PCA components of the foreground patches (all patches when
    fewer than 3 are foreground), background black."""
    h, w, D = patches_hwD.shape
    flat_PD, fg_P = patches_hwD.reshape(h * w, D).float(), foreground_hw.reshape(-1)
    if int(fg_P.sum()) < 3:
        fg_P = torch.ones_like(fg_P)
    rgb_P3 = torch.zeros(h * w, 3)
    rgb_P3[fg_P] = minmax(pca_project(flat_PD[fg_P], 3), (0,))
    return rgb_P3.reshape(h, w, 3)


@torch.no_grad()
def patch_maps(backbone: torch.nn.Module, image: Image.Image, *, size: int = 448, threshold: float = 0.0) -> PatchMaps:
    """Attention and PCA maps of `image` (see the module docstring)."""
    check_size(backbone, size)
    pixels_HW3 = full_pixels(image, size, patch_size(backbone))
    x_13HW = to_tensor(pixels_HW3)[None].to(next(backbone.parameters()).device)
    h, w = backbone.patch_grid(x_13HW)
    patches_hwD = backbone(x_13HW).patches_BND[0].float().cpu().reshape(h, w, -1)
    first_hw = oriented_first_component(patches_hwD)
    foreground_hw = first_hw > threshold
    return PatchMaps(
        image=Image.fromarray(pixels_HW3),
        attention_Khw=cls_attention_heads(backbone, x_13HW)[0].cpu().numpy(),
        first_component_hw=first_hw.numpy(),
        foreground_hw=foreground_hw.numpy(),
        pca_rgb_hw3=foreground_pca_rgb(patches_hwD, foreground_hw).numpy(),
    )


def _panel(map_3hw: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return F.interpolate(map_3hw[None], size=(H, W), mode="nearest")[0]


def render_maps(maps: PatchMaps) -> Image.Image:
    """Top row: [input | mean-head attention | foreground mask | foreground PCA]; below it the
    attention of each head, `HEADS_PER_ROW` a row. Each attention map is min-max scaled."""
    W, H = maps.image.size
    attn_Khw = torch.from_numpy(maps.attention_Khw)
    mean_attn = heat(minmax(attn_Khw.mean(0, keepdim=True), (1, 2)))[0]
    fg = torch.from_numpy(maps.foreground_hw).float().expand(3, -1, -1)
    image_3HW = torch.from_numpy(np.asarray(maps.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    top = [image_3HW] + [_panel(m, H, W) for m in (mean_attn, fg, torch.from_numpy(maps.pca_rgb_hw3).permute(2, 0, 1))]
    heads = [_panel(m, H, W) for m in heat(minmax(attn_Khw, (1, 2)))]
    heads += [torch.zeros(3, H, W)] * (-len(heads) % HEADS_PER_ROW)
    rows = [torch.cat(top, dim=2)]
    rows += [torch.cat(heads[i : i + HEADS_PER_ROW], dim=2) for i in range(0, len(heads), HEADS_PER_ROW)]
    grid_3HW = torch.cat(rows, dim=1)
    return Image.fromarray((grid_3HW.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
