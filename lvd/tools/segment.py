"""Zero-shot segmentation by patch-feature similarity to a masked reference.

`segment(backbone, reference, mask, target, size=...)`:
1. patch features of both images (`features.patch_features`: whole image, shorter side `size`);
2. the reference mask is reduced to the patch grid (a patch is in when at least half of its
   pixels are) and the L2-normalised features of those patches are averaged into a prototype;
3. every target patch gets its cosine similarity to the prototype, bilinearly upsampled to the
   target's own pixel size;
4. pixels above the threshold are the segment. Cosine values depend on the model, so the
   default threshold is Otsu's on the upsampled similarity map; pass a number to fix it.
`render_segmentation` draws [reference + mask | target | similarity | target + segment].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.pretrain.pictures import heat
from lvd.tools.features import patch_features

MASK_OVERLAY = np.array([255, 40, 40], dtype=np.float32)


@dataclass(frozen=True)
class Segmentation:
    """The target's similarity map and segment, at the target's pixel size (H x W)."""

    similarity_HW: np.ndarray  # float32 cosine similarity to the reference prototype
    mask_HW: np.ndarray  # bool: similarity_HW > threshold
    threshold: float  # the one used (Otsu's when none was given)
    reference_patches: int  # how many reference patches formed the prototype


def mask_array(mask: Image.Image | np.ndarray) -> np.ndarray:
    """bool [H, W]: nonzero pixels of a mask image (any mode; alpha ignored) or array."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.ndim != 2:
        raise ValueError(f"mask has shape {mask.shape}: pass a single-channel H x W mask")
    return mask > 0


def mask_to_grid(mask_HW: np.ndarray, h: int, w: int) -> np.ndarray:
    """bool [h, w]: patches at least half covered by the mask (area average onto the grid)."""
    m_11HW = torch.from_numpy(mask_HW.astype(np.float32))[None, None]
    return (F.adaptive_avg_pool2d(m_11HW, (h, w))[0, 0] >= 0.5).numpy()


def prototype(patches_hwD: np.ndarray, grid_mask_hw: np.ndarray) -> np.ndarray:
    """[D] unit vector: the mean of the L2-normalised masked patch features, normalised."""
    if not grid_mask_hw.any():
        raise ValueError(
            "the reference mask covers no patch by half or more: draw a larger mask or pass a larger --size"
        )
    chosen_PD = patches_hwD[grid_mask_hw]
    chosen_PD = chosen_PD / np.linalg.norm(chosen_PD, axis=1, keepdims=True).clip(1e-8)
    mean_D = chosen_PD.mean(0)
    return mean_D / max(float(np.linalg.norm(mean_D)), 1e-8)


def similarity_map(patches_hwD: np.ndarray, proto_D: np.ndarray, size_HW: tuple[int, int]) -> np.ndarray:
    """float32 [H, W]: cosine of each patch to `proto_D`, bilinearly upsampled to `size_HW`."""
    norms_hw = np.linalg.norm(patches_hwD, axis=2).clip(1e-8)
    cos_hw = (patches_hwD @ proto_D) / norms_hw
    cos_11hw = torch.from_numpy(cos_hw.astype(np.float32))[None, None]
    return F.interpolate(cos_11hw, size=size_HW, mode="bilinear", align_corners=False)[0, 0].numpy()


def otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values.flat[0])


def segment(
    backbone: torch.nn.Module,
    reference: Image.Image,
    mask: Image.Image | np.ndarray,
    target: Image.Image,
    *,
    size: int = 448,
    threshold: float | None = None,
) -> Segmentation:
    """Segment `target` by similarity to the `mask`ed part of `reference` (module docstring)."""
    mask_HW = mask_array(mask)
    if mask_HW.shape != (reference.height, reference.width):
        raise ValueError(
            f"mask is {mask_HW.shape[1]}x{mask_HW.shape[0]} but the reference image is "
            f"{reference.width}x{reference.height}: the mask must have the reference's size"
        )
    _, ref_hwD = patch_features(backbone, reference, size)
    grid_hw = mask_to_grid(mask_HW, *ref_hwD.shape[:2])
    proto_D = prototype(ref_hwD, grid_hw)
    _, tgt_hwD = patch_features(backbone, target, size)
    sim_HW = similarity_map(tgt_hwD, proto_D, (target.height, target.width))
    cut = otsu(sim_HW) if threshold is None else float(threshold)
    return Segmentation(similarity_HW=sim_HW, mask_HW=sim_HW > cut, threshold=cut, reference_patches=int(grid_hw.sum()))


def _overlay(image: Image.Image, mask_HW: np.ndarray) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    rgb[mask_HW] = 0.5 * rgb[mask_HW] + 0.5 * MASK_OVERLAY
    return rgb


def render_segmentation(
    reference: Image.Image, mask: Image.Image | np.ndarray, target: Image.Image, seg: Segmentation, *, height: int = 224
) -> Image.Image:
    """[reference with its mask in red | target | similarity (min-max heat) | target with the
    segment in red], each scaled to `height` pixels high."""
    sim = torch.from_numpy(seg.similarity_HW)
    lo, hi = sim.min(), sim.max()
    sim_rgb = heat(((sim - lo) / (hi - lo).clamp_min(1e-8))[None])[0].permute(1, 2, 0).numpy() * 255
    panels = [
        _overlay(reference, mask_array(mask)),
        np.asarray(target.convert("RGB"), np.float32),
        sim_rgb,
        _overlay(target, seg.mask_HW),
    ]
    scaled = []
    for p in panels:
        img = Image.fromarray(p.round().clip(0, 255).astype(np.uint8))
        scaled.append(
            np.asarray(img.resize((max(1, round(img.width * height / img.height)), height), Image.Resampling.BILINEAR))
        )
    return Image.fromarray(np.concatenate(scaled, axis=1))
