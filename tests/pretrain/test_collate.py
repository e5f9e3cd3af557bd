"""Collate: crop-major order, masks and iBOT weights, device/pin helpers."""

from __future__ import annotations

import math

import numpy as np
import torch

from lvd.pretrain.data.augmentations import Crops
from lvd.pretrain.data.collate import Batch, collate
from lvd.pretrain.data.masking import MaskingConfig
from lvd.pretrain.losses import iBOTPatchLoss


def fake_crops(image_id: int, n_global: int = 2, n_local: int = 3) -> Crops:
    """Crops whose pixels encode (image, crop) so the stacking order is visible."""
    return Crops(
        global_crops=[torch.full((3, 28, 28), 10.0 * image_id + c) for c in range(n_global)],
        local_crops=[torch.full((3, 14, 14), 10.0 * image_id + c) for c in range(n_local)],
    )


def test_crop_major_order_and_shapes():
    batch = collate([fake_crops(i) for i in range(4)], MaskingConfig(), np.random.default_rng(0))
    assert batch.global_crops.shape == (8, 3, 28, 28) and batch.local_crops.shape == (12, 3, 14, 14)
    # row r = crop r // B of image r % B
    assert batch.global_crops[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert batch.local_crops[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]
    assert (batch.n_global, batch.n_local, batch.n_images) == (2, 3, 4)


def test_masks_indices_and_weights_are_consistent():
    cfg = MaskingConfig(patch_size=14)
    batch = collate([fake_crops(i, n_global=2) for i in range(16)], cfg, np.random.default_rng(1))
    assert batch.masks.shape == (32, 4)  # 28 px crops, patch 14: a 2x2 grid
    # a 224 px crop gives the 16x16 grid of ViT-*/14
    big = [Crops(global_crops=[torch.zeros(3, 224, 224)] * 2, local_crops=[]) for _ in range(16)]
    batch = collate(big, cfg, np.random.default_rng(1))
    masks = batch.masks
    assert masks.shape == (32, 256) and masks.dtype == torch.bool
    assert (masks.sum(1) > 0).sum() == 16  # half the global crops masked
    assert torch.equal(batch.mask_indices, masks.flatten().nonzero().flatten())
    assert batch.n_masked == int(masks.sum()) <= batch.mask_upperbound
    # weights: 1/(masked tokens of the crop) for each masked token, so they sum to #masked crops
    crop_of_token = batch.mask_indices // 256
    assert torch.allclose(batch.mask_weights, 1.0 / masks.sum(1)[crop_of_token].float())
    assert math.isclose(batch.mask_weights.sum().item(), 16.0, rel_tol=1e-5)
    assert batch.local_crops.shape == (0, 3, 0, 0)


def test_ibot_loss_with_collated_weights_is_mean_over_masked_crops():
    """Uniform student, one-hot teacher: every masked token costs log K; loss = log K * masked/total."""
    big = [Crops(global_crops=[torch.zeros(3, 224, 224)] * 2, local_crops=[]) for _ in range(4)]
    batch = collate(big, MaskingConfig(), np.random.default_rng(3))
    K = 5
    teacher = torch.nn.functional.one_hot(torch.arange(batch.n_masked) % K, K).float()
    loss = iBOTPatchLoss(K)(torch.zeros(batch.n_masked, K), teacher, batch.mask_weights, n_crops=8)
    assert math.isclose(loss.item(), math.log(K) * 4 / 8, rel_tol=1e-5)


def test_to_and_pin_memory_keep_the_dataclass():
    batch = collate([fake_crops(i) for i in range(2)], MaskingConfig(), np.random.default_rng(0), uids=("a", "b"))
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.uids == ("a", "b")
    assert torch.equal(moved.global_crops, batch.global_crops)
    if torch.cuda.is_available():
        assert batch.pin_memory().global_crops.is_pinned()
