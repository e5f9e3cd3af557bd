"""Schedules: end points, warmup shape, frozen prototypes, sqrt batch scaling; recipes."""

import dataclasses
import math

import numpy as np
import pytest

from lvd.pretrain.recipes import RECIPES, Recipe, get_recipe, tiny
from lvd.pretrain.schedules import build_schedules, cosine, scaled_lr


def _cfg(**kw):
    """The official ViT-S/14 schedule values (vits14 recipe), over 1000 steps of batch 256."""
    base = dataclasses.replace(
        get_recipe("vits14").schedule_config(), total_iters=1000, epoch_length=10, global_batch_size=256
    )
    return dataclasses.replace(base, **kw)


def test_cosine_end_points():
    c = cosine(1.0, 0.0, 4)
    # half a cosine sampled at i/n for i = 0..3: 1, (1+cos(pi/4))/2, 0.5, (1+cos(3pi/4))/2
    np.testing.assert_allclose(c, [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])


def test_lr_warmup_then_cosine_scaled_by_sqrt_batch():
    s = build_schedules(_cfg())
    peak = 4e-3 * math.sqrt(256 / 1024)  # = 2e-3
    assert peak == pytest.approx(2e-3)
    assert s.lr[0] == 0.0
    assert s.lr[50] == pytest.approx(peak / 2)  # halfway through the 100-step warmup
    assert s.lr[100] == pytest.approx(peak)
    assert s.lr.argmax() == 100
    assert s.lr[-1] == pytest.approx(1e-6, abs=1e-6)
    assert np.all(np.diff(s.lr[100:]) <= 0)
    assert len(s) == 1000


def test_weight_decay_momentum_teacher_temp_end_points():
    s = build_schedules(_cfg())
    assert s.weight_decay[0] == pytest.approx(0.04)
    assert s.weight_decay[-1] == pytest.approx(0.4, abs=1e-4)
    assert s.momentum[0] == pytest.approx(0.992)
    assert s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[150] == pytest.approx(0.055)  # linear: halfway through 300 steps
    assert np.all(s.teacher_temp[300:] == 0.07)


def test_last_layer_frozen_for_first_epoch_only():
    s = build_schedules(_cfg())
    assert np.all(s.last_layer_lr[:10] == 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[10:], s.lr[10:])
    v = s.at(10)
    assert v.last_layer_lr == v.lr > 0


def test_schedules_shorter_than_warmup():
    s = build_schedules(_cfg(total_iters=5))
    assert len(s) == 5 and s.lr.max() < scaled_lr(4e-3, 256)


def test_at_out_of_range():
    with pytest.raises(IndexError, match="outside"):
        build_schedules(_cfg()).at(1000)


def test_recipes_official_values_and_round_trip():
    s, g = get_recipe("vits14"), get_recipe("vitg14")
    assert s.optim.base_lr == 4e-3 and s.optim.layerwise_decay == 0.9
    assert s.dino_head.n_prototypes == 65536 and s.loss.koleo_weight == 0.1
    assert (s.crops.global_size, s.crops.local_size, s.crops.n_local) == (224, 98, 8)
    assert g.loss.separate_ibot_head and g.loss.centering == "sinkhorn_knopp"
    assert g.backbone.drop_path_rate == 0.4 and g.optim.layerwise_decay == 1.0
    assert g.dino_head.n_prototypes == 131072 and g.teacher.momentum == 0.994
    for name in RECIPES:
        r = get_recipe(name)
        assert Recipe.from_dict(r.to_dict()) == r


def test_recipe_validation_says_what_to_change():
    from dataclasses import replace

    t = tiny()
    with pytest.raises(ValueError, match="multiple of patch size"):
        replace(t, crops=replace(t.crops, global_size=50))
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("vit_huge")
