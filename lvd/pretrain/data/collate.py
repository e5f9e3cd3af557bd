"""Collate per-image `Crops` into a typed `Batch` with iBOT masks.

Crops are stacked crop-major like the official collate: rows [0, B) are every image's
global crop 0, rows [B, 2B) global crop 1, ... so `x.view(G, B, ...)` splits by crop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from lvd.pretrain.data.augmentations import Crops
from lvd.pretrain.data.masking import BlockMaskGenerator, MaskingConfig


@dataclass
class Batch:
    global_crops: torch.Tensor  # [G*B, 3, H, W] float32, crop-major
    local_crops: torch.Tensor  # [L*B, 3, h, w] float32, crop-major ([0, 3, 0, 0] without locals)
    masks: torch.Tensor  # [G*B, N] bool, N = (H // patch)^2, True = masked for the student
    mask_indices: torch.Tensor  # [M] int64, flat indices into masks.view(-1): rows of tokens.flatten(0, 1)
    mask_weights: torch.Tensor  # [M] float32, 1 / (masked tokens of the crop each index belongs to)
    mask_upperbound: int  # >= M for any batch of this config (static buffer size, official "upperbound")
    n_global: int
    n_local: int
    n_images: int  # B
    uids: tuple[str, ...] = ()  # one per image, when read from shards
    n_corrupt: int = 0  # samples of this batch that could not be decoded and were replaced
    batch_index: int = -1  # position in the rank's stream (for resume checks)

    @property
    def n_masked(self) -> int:
        return int(self.mask_indices.numel())

    def _map_tensors(self, fn) -> Batch:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        changes = {name: fn(v) for name, v in values.items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, *, non_blocking: bool = True) -> Batch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map_tensors(lambda t: t.pin_memory())


def _stack_crop_major(per_image: list[list[torch.Tensor]]) -> torch.Tensor:
    n_crops = len(per_image[0])
    if n_crops == 0:
        return torch.empty(0, 3, 0, 0)
    return torch.stack([crops[i] for i in range(n_crops) for crops in per_image])


def collate(
    samples: list[Crops],
    mask_cfg: MaskingConfig,
    rng: np.random.Generator,
    *,
    uids: tuple[str, ...] = (),
    n_corrupt: int = 0,
    batch_index: int = -1,
) -> Batch:
    if not samples:
        raise ValueError("collate needs at least one sample")
    global_crops = _stack_crop_major([s.global_crops for s in samples])
    size = global_crops.shape[-1]
    if size % mask_cfg.patch_size:
        raise ValueError(f"global crop size {size} is not a multiple of patch_size {mask_cfg.patch_size}")
    grid = (size // mask_cfg.patch_size,) * 2
    n_crops = global_crops.shape[0]
    masks = torch.from_numpy(
        BlockMaskGenerator.from_config(grid, mask_cfg).sample_masks(
            n_crops,
            ratio_range=(mask_cfg.ratio_min, mask_cfg.ratio_max),
            masked_fraction=mask_cfg.sample_probability,
            rng=rng,
        )
    )
    n_masked_per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    n_tokens = grid[0] * grid[1]
    return Batch(
        global_crops=global_crops,
        local_crops=_stack_crop_major([s.local_crops for s in samples]),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / n_masked_per_crop).expand_as(masks)[masks],
        mask_upperbound=_upperbound(n_crops, n_tokens, mask_cfg),
        n_global=len(samples[0].global_crops),
        n_local=len(samples[0].local_crops),
        n_images=len(samples),
        uids=tuple(uids),
        n_corrupt=n_corrupt,
        batch_index=batch_index,
    )


def _upperbound(n_crops: int, n_tokens: int, cfg: MaskingConfig) -> int:
    """Most masked tokens any batch can have: each stratum's target is below its top edge."""
    n_masked = int(n_crops * cfg.sample_probability)
    bounds = np.linspace(cfg.ratio_min, cfg.ratio_max, n_masked + 1)
    return int(sum(int(n_tokens * b) for b in bounds[1:]))
