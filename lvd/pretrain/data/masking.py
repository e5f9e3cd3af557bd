"""Block-wise masks for iBOT (BEiT-style, as `dinov2/data/masking.py` + `collate.py`).

A mask of `target` patches is grown from random rectangles of log-uniform aspect ratio
and area in [min_num_patches, remaining]; a rectangle is kept only if it adds between 1
and `remaining` new patches, so the mask never exceeds its target (it may fall short
when 10 tries in a row fail, as in the official generator).

Per batch, a share `masked_fraction` (config: `sample_probability`) of the crops is
masked; their target ratios are drawn one per stratum of
`linspace(ratio_min, ratio_max, n_masked + 1)` so the batch covers the whole range, and
the masks are shuffled across crops (official collate).
All randomness comes from the numpy Generator passed in, so masks are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    patch_size: int = 14  # the mask grid is global_size // patch_size on each side
    sample_probability: float = 0.5  # share of a batch's global crops that get masked
    ratio_min: float = 0.1  # masked share of a masked crop's patches, stratified in [min, max]
    ratio_max: float = 0.5
    min_num_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect
    max_block_fraction: float = 0.5  # largest single block, of the grid (official train.py: 0.5)

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size}: must match the ViT's patch size")
        if not 0.0 <= self.ratio_min <= self.ratio_max <= 1.0:
            raise ValueError(f"ratio_min={self.ratio_min}, ratio_max={self.ratio_max}: need 0 <= min <= max <= 1")
        if not 0.0 <= self.sample_probability <= 1.0:
            raise ValueError(f"sample_probability={self.sample_probability}: must be in [0, 1] (DINOv2: 0.5)")
        if self.min_num_patches < 1 or self.min_aspect <= 0:
            raise ValueError("min_num_patches must be >= 1 and min_aspect > 0")
        if not 0.0 < self.max_block_fraction <= 1.0:
            raise ValueError(f"max_block_fraction={self.max_block_fraction}: must be in (0, 1]")


class BlockMaskGenerator:
    def __init__(
        self,
        grid: tuple[int, int],
        *,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches // 2 if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def from_config(cls, grid: tuple[int, int], cfg: MaskingConfig) -> BlockMaskGenerator:
        return cls(
            grid,
            min_num_patches=cfg.min_num_patches,
            max_num_patches=int(cfg.max_block_fraction * grid[0] * grid[1]),
            min_aspect=cfg.min_aspect,
            max_aspect=cfg.max_aspect,
        )

    def _add_block(self, mask_HW: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..max_new patches."""
        for _ in range(10):
            # when fewer than min_num_patches remain, draw between the two (like random.uniform)
            area = rng.uniform(*sorted((self.min_num_patches, max_new)))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (w < self.width and h < self.height):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask_HW[top : top + h, left : left + w]
            new = int(h * w - block.sum())
            if 0 < new <= max_new:
                block[...] = True
                return new
        return 0

    def __call__(self, n_target: int, rng: np.random.Generator) -> np.ndarray:
        """A [H, W] bool mask with at most `n_target` masked patches."""
        mask_HW = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_target:
            added = self._add_block(mask_HW, min(n_target - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask_HW

    def sample_masks(
        self,
        n_images: int,
        *,
        ratio_range: tuple[float, float] = (0.1, 0.5),
        masked_fraction: float = 0.5,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """[n_images, H*W] bool: stratified ratios on int(n*fraction) crops, shuffled."""
        n_masked = int(n_images * masked_fraction)
        bounds = np.linspace(*ratio_range, n_masked + 1)
        masks = [self(int(self.num_patches * rng.uniform(bounds[i], bounds[i + 1])), rng) for i in range(n_masked)]
        masks += [np.zeros((self.height, self.width), dtype=bool)] * (n_images - n_masked)
        order = rng.permutation(n_images)
        return np.stack([masks[i] for i in order]).reshape(n_images, -1)
