"""Block masks: targets respected, blocks contiguous, stratified ratios, masked fraction."""

from __future__ import annotations

import numpy as np
import pytest

from lvd.pretrain.data.masking import BlockMaskGenerator, MaskingConfig


def test_mask_never_exceeds_target_and_reaches_it_nearly():
    gen, rng = BlockMaskGenerator((16, 16)), np.random.default_rng(0)
    for target in (4, 26, 77, 128):
        counts = np.array([gen(target, rng).sum() for _ in range(50)])
        assert counts.max() <= target
        assert counts.mean() >= 0.95 * target


def test_zero_target_gives_empty_mask():
    assert BlockMaskGenerator((16, 16))(0, np.random.default_rng(1)).sum() == 0


def test_each_block_is_a_filled_rectangle_within_budget():
    gen = BlockMaskGenerator((14, 14))
    for seed in range(30):
        mask = np.zeros((14, 14), dtype=bool)
        added = gen._add_block(mask, 40, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        assert 1 <= added <= 40 and added == mask.sum()
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        aspect = (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)
        assert 1 / 5 <= aspect <= 5  # log-uniform in [0.3, 1/0.3]; rounding a 1-wide block can reach 5


def test_sample_masks_stratified_ratios_and_masked_fraction():
    gen = BlockMaskGenerator((16, 16))
    n_images, n_tokens = 64, 256
    masks = gen.sample_masks(n_images, ratio_range=(0.1, 0.5), masked_fraction=0.5, rng=np.random.default_rng(2))
    assert masks.shape == (n_images, n_tokens) and masks.dtype == bool
    ratios = np.sort(masks.sum(axis=1) / n_tokens)
    assert (ratios == 0).sum() == 32  # exactly half the crops are unmasked
    masked = ratios[32:]
    # stratum i is [0.1 + 0.4 i/32, 0.1 + 0.4 (i+1)/32]: the k-th smallest ratio sits at most
    # one stratum above its own (the generator may fall slightly short, never over)
    upper = 0.1 + 0.4 * (np.arange(32) + 1) / 32
    assert (masked <= upper + 1e-9).all()
    assert (masked >= upper - 3 * 0.4 / 32).all()
    assert masked.min() >= 0.09 and masked.max() <= 0.5


def test_sample_masks_are_reproducible_for_a_seed():
    gen = BlockMaskGenerator((16, 16))
    a = gen.sample_masks(8, rng=np.random.default_rng(5))
    b = gen.sample_masks(8, rng=np.random.default_rng(5))
    c = gen.sample_masks(8, rng=np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_mask_config_validation():
    with pytest.raises(ValueError, match="ratio_min"):
        MaskingConfig(ratio_min=0.5, ratio_max=0.1)
    with pytest.raises(ValueError, match="sample_probability"):
        MaskingConfig(sample_probability=1.5)
