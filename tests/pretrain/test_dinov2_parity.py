"""Parity with the official DINOv2 code: the registry's `dinov2` 0.0.1.dev2 (April 2023).

Installed without its pins (torch 2.0, xformers; scripts/setup.sh --test). Without xformers
its layers fall back to plain attention / SwiGLU, so on CPU we compare, on the same weights
and inputs: blocks and the whole backbone (MLP and SwiGLU), the 0.1-offset position
interpolation, the DINO / iBOT / KoLeo losses with both centrings, block masking and the
collate's ratio strata (driven by one Python `random` stream), the multi-crop and recipe
parameters, and one student/teacher step with its gradients and EMA update.

What cannot be compared, and why:
- registers: this package predates them (no `register_tokens`); lvd's register models are
  checked against Hugging Face `Dinov2WithRegisters` in test_hf.py instead;
- `SSLMetaArch` itself: its module asserts xformers at import, moves batches with `.cuda()`,
  concatenates head inputs with xformers' `BlockDiagonalMask` and wraps modules in FSDP1.
  `official_step` below replays its `forward_backward` line by line from the official
  modules (backbone, `DINOHead`, losses) with the xformers concatenation replaced by one
  head call per input (the head acts row by row, so the values are the same);
- the list forward (`forward_features_list`, nested tensors) needs xformers: crops go
  through the backbone one tensor at a time instead.
- the official iBOT centre also averages padding: its step calls `update_center(x[:n_masked])`
  on the unsqueezed [1, upperbound, K] head output, a slice of the size-1 dim, so the head's
  outputs for the zero-padded buffer rows enter the mean. lvd averages the masked tokens
  only (the stated intent); the step test feeds the official loss unpadded tokens.
Deliberate departures, asserted as such: the blur probabilities (the official
`GaussianBlur(p)` hands 1 - p to RandomApply), 98 px local crops (96 is not a multiple of
patch 14), the prototype gain (official weight_g is trainable, lvd's fixed at 1).
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import partial
from pathlib import Path

import dinov2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.layers import DINOHead as OfficialHead
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.loss import DINOLoss as OfficialDINOLoss
from dinov2.loss import KoLeoLoss as OfficialKoLeo
from dinov2.loss import iBOTPatchLoss as OfficialiBOTLoss
from dinov2.models.vision_transformer import DinoVisionTransformer
from torchvision import transforms

from lvd.pretrain.data.augmentations import MultiCrop, MultiCropConfig
from lvd.pretrain.data.collate import Batch
from lvd.pretrain.data.masking import BlockMaskGenerator, MaskingConfig
from lvd.pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from lvd.pretrain.losses.sinkhorn import sinkhorn_knopp
from lvd.pretrain.meta_arch import MetaArch
from lvd.pretrain.models.official import load_official_state_dict
from lvd.pretrain.models.vit import VisionTransformer
from lvd.pretrain.recipes import tiny, vits14

D, HEADS, DEPTH, SIZE, PATCH = 192, 3, 3, 56, 14


def official_vit(*, ffn: str = "mlp", depth: int = DEPTH, seed: int = 0) -> DinoVisionTransformer:
    """The official backbone with random non-trivial weights (LayerScale, biases, mask token)."""
    torch.manual_seed(seed)
    model = DinoVisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=D,
        depth=depth,
        num_heads=HEADS,
        init_values=1.0,
        ffn_layer=ffn,
        block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def lvd_twin(official: DinoVisionTransformer, *, ffn: str = "mlp", depth: int = DEPTH) -> VisionTransformer:
    model = VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=D,
        depth=depth,
        num_heads=HEADS,
        ffn=ffn,
        layerscale_init=1.0,
        num_register_tokens=0,
    )
    load_official_state_dict(model, official.state_dict())
    return model.eval()


def images(n: int, h: int = SIZE, w: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo group: the official iBOT Sinkhorn all-reduces unconditionally."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ---------------------------------------------------------------- backbone


def test_the_package_predates_registers():
    assert not hasattr(official_vit(depth=1), "register_tokens")


@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
def test_blocks_give_the_official_outputs(ffn):
    official = official_vit(ffn=ffn)
    ours = lvd_twin(official, ffn="mlp" if ffn == "mlp" else "swiglu")
    x = torch.randn(2, 1 + 16, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for theirs, mine in zip(official.blocks, ours.blocks):
            torch.testing.assert_close(mine(x), theirs(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
@pytest.mark.parametrize("hw", [(SIZE, SIZE), (42, 70), (98, 98)])  # native, non-square, larger
def test_backbone_forward_matches_with_masks_and_interpolation(ffn, hw):
    official = official_vit(ffn=ffn)
    ours = lvd_twin(official, ffn="mlp" if ffn == "mlp" else "swiglu")
    x = images(3, *hw)
    n = (hw[0] // PATCH) * (hw[1] // PATCH)
    masks = torch.rand(3, n, generator=torch.Generator().manual_seed(4)) < 0.4
    with torch.no_grad():
        ref = official(x, masks=masks, is_training=True)
        out = ours(x, masks_BN=masks)
    torch.testing.assert_close(out.cls_BD, ref["x_norm_clstoken"], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(out.patches_BND, ref["x_norm_patchtokens"], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_prenorm_BD, ref["x_prenorm"][:, 0], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(28, 28), (70, 70), (42, 98), (112, 56)])
def test_position_interpolation_is_the_official_formula(hw):
    """A random (non-constant) position field: any other resize formula moves the values."""
    official = official_vit(depth=1)
    ours = lvd_twin(official, depth=1)
    x = torch.zeros(1, 1 + (hw[0] // PATCH) * (hw[1] // PATCH), D)
    with torch.no_grad():
        # official signature is (x, w, h) with w = dim 2 of the image (its own naming)
        ref = official.interpolate_pos_encoding(x, hw[0], hw[1])
        got = ours.interpolate_pos_embed(hw[0] // PATCH, hw[1] // PATCH)
    assert ref.std() > 0.01
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- losses


def _logits(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_dino_centering_loss_and_center_update_match():
    G, L, B, K = 2, 3, 5, 64
    theirs, ours = OfficialDINOLoss(K), DINOLoss(K)
    center = _logits(1, K, seed=0)
    theirs.center.copy_(center)
    ours.center.copy_(center)
    teacher_NK, s_glob, s_loc = _logits(G * B, K, seed=1), _logits(G * B, K, seed=2), _logits(L * B, K, seed=3)
    # official: teacher chunks swapped before the head so student crop A meets teacher crop B
    swapped = torch.cat(teacher_NK.chunk(2)[::-1])
    t_ref = theirs.softmax_center_teacher(swapped, teacher_temp=0.05).view(G, B, K)
    theirs.update_center(swapped)
    t_ours = ours.softmax_center_teacher(teacher_NK, 0.05)
    ours.update_center(teacher_NK)
    torch.testing.assert_close(t_ours.view(G, B, K).flip(0), t_ref)
    n_terms = G * (G - 1) + L * G
    ref = (theirs(list(s_loc.chunk(L)), t_ref) + 2 * theirs([s_glob], [t_ref.flatten(0, 1)])) / n_terms
    got = ours(s_glob.view(G, B, K), s_loc.view(L, B, K), t_ours.view(G, B, K))
    torch.testing.assert_close(got, ref)
    theirs.apply_center_update()  # the official applies the EMA lazily, at the next use
    torch.testing.assert_close(ours.center, theirs.center)


def test_dino_sinkhorn_teacher_matches():
    logits = _logits(40, 64, seed=5, scale=0.5)  # small enough that the official exp() is finite
    ref = OfficialDINOLoss(64).sinkhorn_knopp_teacher(logits, teacher_temp=0.07)
    torch.testing.assert_close(DINOLoss(64).sinkhorn_knopp_teacher(logits, 0.07), ref, atol=1e-6, rtol=1e-5)


def test_sinkhorn_departure_large_logits_stay_finite_where_the_official_overflows():
    logits = _logits(40, 64, seed=6, scale=8.0)
    assert not torch.isfinite(OfficialDINOLoss(64).sinkhorn_knopp_teacher(logits, 0.04)).all()
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(40))


def _masks_and_weights(n_crops: int, n_tokens: int, seed: int):
    masks = torch.rand(n_crops, n_tokens, generator=torch.Generator().manual_seed(seed)) < 0.3
    masks[0] = False  # an unmasked crop still counts in the official denominator
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return masks, weights


def test_ibot_centering_loss_and_center_update_match():
    K = 48
    masks, weights = _masks_and_weights(6, 16, seed=7)
    M = int(masks.sum())
    theirs, ours = OfficialiBOTLoss(K), iBOTPatchLoss(K)
    center = _logits(1, K, seed=8)
    theirs.center.copy_(center.view(1, 1, K))
    ours.center.copy_(center)
    teacher, student = _logits(M, K, seed=9), _logits(M, K, seed=10)
    t_ref = theirs.softmax_center_teacher(teacher.unsqueeze(0), teacher_temp=0.06).squeeze(0)
    theirs.update_center(teacher.unsqueeze(0))
    t_ours = ours.softmax_center_teacher(teacher, 0.06)
    ours.update_center(teacher)
    torch.testing.assert_close(t_ours, t_ref)
    ref = theirs.forward_masked(student, t_ref, student_masks_flat=masks, n_masked_patches=M, masks_weight=weights)
    torch.testing.assert_close(ours(student, t_ours, weights, n_crops=masks.shape[0]), ref)
    theirs.apply_center_update()
    torch.testing.assert_close(ours.center, theirs.center.view(1, K))


def test_ibot_sinkhorn_teacher_matches(one_rank_group):
    teacher = _logits(30, 48, seed=11, scale=0.5)
    ref = OfficialiBOTLoss(48).sinkhorn_knopp_teacher(
        teacher, teacher_temp=0.07, n_masked_patches_tensor=torch.tensor([30])
    )
    torch.testing.assert_close(iBOTPatchLoss(48).sinkhorn_knopp_teacher(teacher, 0.07), ref, atol=1e-6, rtol=1e-5)


def test_koleo_matches():
    x = _logits(16, D, seed=12)
    torch.testing.assert_close(KoLeoLoss()(x), OfficialKoLeo()(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- masking and multi-crop


class PythonRandom:
    """The numpy-Generator calls lvd's masking makes, answered from Python's `random`
    module: the official generator's source of randomness, so both consume one stream."""

    def uniform(self, lo: float, hi: float) -> float:
        return random.uniform(lo, hi)

    def integers(self, lo: int, hi: int) -> int:
        return random.randint(lo, hi - 1)  # numpy's high is exclusive

    def permutation(self, n: int) -> np.ndarray:
        order = list(range(n))
        random.shuffle(order)
        return np.asarray(order)


@pytest.mark.parametrize("grid", [(16, 16), (4, 4), (6, 9)])
def test_block_masks_are_the_official_ones_from_the_same_random_stream(grid):
    # min_num_patches=1: lvd sorts (min, remaining) before drawing an area, the official
    # draws uniform(min, remaining) even when remaining < min (same law, other value)
    n = grid[0] * grid[1]
    official = MaskingGenerator(grid, min_num_patches=1, max_num_patches=0.5 * n)
    ours = BlockMaskGenerator(grid, min_num_patches=1, max_num_patches=int(0.5 * n))
    for trial, target in enumerate([1, n // 10, n // 4, n // 2, int(0.7 * n)] * 20):
        random.seed(trial)
        ref = official(target)
        random.seed(trial)
        np.testing.assert_array_equal(ours(target, PythonRandom()), ref)


def test_block_masks_with_the_default_minimum_follow_the_same_law():
    grid, n, draws = (16, 16), 256, 400
    official = MaskingGenerator(grid, max_num_patches=0.5 * n)
    ours = BlockMaskGenerator.from_config(grid, MaskingConfig())
    rng = np.random.default_rng(0)
    random.seed(0)
    for target in (26, 64, 128):
        ref = np.mean([official(target).sum() for _ in range(draws)])
        got = np.mean([ours(target, rng).sum() for _ in range(draws)])
        assert abs(got - ref) < 0.03 * target, (target, got, ref)


def test_collate_masks_match_the_official_collate():
    """Ratio strata, masked share and shuffle of a batch (min_num_patches=1, see above)."""
    cfg = MaskingConfig(min_num_patches=1)  # otherwise the defaults: p 0.5, ratios 0.1-0.5, blocks <= half
    grid = (16, 16)
    n_tokens, n_images = grid[0] * grid[1], 16
    sample = ({"global_crops": [torch.zeros(3, 2, 2)] * 2, "local_crops": [torch.zeros(3, 1, 1)]}, None)
    official = MaskingGenerator(grid, min_num_patches=1, max_num_patches=0.5 * n_tokens)
    random.seed(5)
    ref = collate_data_and_cast(
        [sample] * n_images,
        (cfg.ratio_min, cfg.ratio_max),
        cfg.sample_probability,
        torch.float32,
        n_tokens=n_tokens,
        mask_generator=official,
    )
    random.seed(5)
    got = BlockMaskGenerator.from_config(grid, cfg).sample_masks(
        2 * n_images,
        ratio_range=(cfg.ratio_min, cfg.ratio_max),
        masked_fraction=cfg.sample_probability,
        rng=PythonRandom(),
    )
    # the official strata come from a float32 linspace, ours float64: a target on an integer
    # edge could part the two; this seed has none
    np.testing.assert_array_equal(got, ref["collated_masks"].numpy())
    assert int(ref["collated_masks"].any(1).sum()) == n_images  # half the crops masked


def _official_defaults() -> dict:
    # read as a file: importing dinov2.configs needs omegaconf, which nothing else here does
    return yaml.safe_load((Path(dinov2.__file__).parent / "configs" / "ssl_default_config.yaml").read_text())


def _find(compose, kind):
    found = []
    for t in getattr(compose, "transforms", []):
        found += [t] if isinstance(t, kind) else _find(t, kind)
    return found


def test_multicrop_parameters_match_the_official_augmentation():
    c = _official_defaults()["crops"]
    theirs = DataAugmentationDINO(
        c["global_crops_scale"],
        c["local_crops_scale"],
        c["local_crops_number"],
        global_crops_size=c["global_crops_size"],
        local_crops_size=c["local_crops_size"],
    )
    cfg = MultiCropConfig()
    ours = MultiCrop(cfg)
    assert (cfg.global_size, cfg.n_local) == (c["global_crops_size"], c["local_crops_number"])
    assert cfg.global_scale == tuple(c["global_crops_scale"]) and cfg.local_scale == tuple(c["local_crops_scale"])
    assert cfg.local_size == 98 and c["local_crops_size"] == 96  # departure: 7 whole patches of 14
    for official_geo, mine, size in (
        (theirs.geometric_augmentation_global, ours.global_transforms[0], 224),
        (theirs.geometric_augmentation_local, ours.local_transform, 98),
    ):
        (rrc,), (mine_rrc,) = official_geo.transforms[:1], mine.transforms[:1]
        assert tuple(rrc.scale) == tuple(mine_rrc.scale) and rrc.interpolation.value == mine_rrc.interpolation.value
        assert tuple(mine_rrc.size) == (size, size)
        assert official_geo.transforms[1].p == mine.transforms[1].p == 0.5
    (jitter,) = _find(theirs.global_transfo1, transforms.ColorJitter)
    my_jitter = ours.global_transforms[0].transforms[2].transforms[0]
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert tuple(getattr(jitter, name)) == tuple(getattr(my_jitter, name))
    assert theirs.global_transfo1.transforms[0].transforms[0].p == ours.global_transforms[0].transforms[2].p == 0.8
    assert theirs.global_transfo1.transforms[0].transforms[1].p == ours.global_transforms[0].transforms[3].p == 0.2
    solarize = _find(theirs.global_transfo2, transforms.RandomSolarize)[0]
    assert (solarize.threshold, solarize.p) == (128, 0.2) and cfg.global_solarize_p == (0.0, 0.2)
    norm = _find(theirs.normalize, transforms.Normalize)[0]
    assert tuple(norm.mean) == cfg.mean and tuple(norm.std) == cfg.std
    # blur: official RandomApply p is 1 - the stated p; lvd applies the stated (paper) p
    applied = [
        theirs.global_transfo1.transforms[1].p,
        theirs.global_transfo2.transforms[1].transforms[0].p,
        theirs.local_transfo.transforms[1].p,
    ]
    assert [1 - p for p in applied] == pytest.approx([*cfg.global_blur_p, cfg.local_blur_p])
    blur = theirs.global_transfo1.transforms[1].transforms[0]
    assert blur.kernel_size == (9, 9) and tuple(blur.sigma) == (0.1, 2.0)


def test_vits14_recipe_is_the_official_default_config():
    c, r = _official_defaults(), vits14()
    assert (r.dino_head.n_prototypes, r.dino_head.hidden_dim, r.dino_head.bottleneck_dim, r.dino_head.n_layers) == (
        c["dino"]["head_n_prototypes"],
        c["dino"]["head_hidden_dim"],
        c["dino"]["head_bottleneck_dim"],
        c["dino"]["head_nlayers"],
    )
    assert (r.loss.dino_weight, r.loss.koleo_weight, r.loss.ibot_weight) == (
        c["dino"]["loss_weight"],
        c["dino"]["koleo_loss_weight"],
        c["ibot"]["loss_weight"],
    )
    assert (r.masks.ratio_min, r.masks.ratio_max) == tuple(c["ibot"]["mask_ratio_min_max"])
    assert r.masks.sample_probability == c["ibot"]["mask_sample_probability"]
    assert r.loss.separate_ibot_head == c["ibot"]["separate_head"] and r.loss.centering == c["train"]["centering"]
    t, o = c["teacher"], c["optim"]
    assert (
        r.teacher.momentum,
        r.teacher.momentum_end,
        r.teacher.temp_start,
        r.teacher.temp,
        r.teacher.temp_warmup_epochs,
    ) == (
        t["momentum_teacher"],
        t["final_momentum_teacher"],
        t["warmup_teacher_temp"],
        t["teacher_temp"],
        t["warmup_teacher_temp_epochs"],
    )
    assert (
        r.epochs,
        r.optim.weight_decay,
        r.optim.weight_decay_end,
        r.optim.base_lr,
        r.optim.warmup_epochs,
        r.optim.min_lr,
        r.optim.clip_grad,
        r.optim.freeze_last_layer_epochs,
        r.optim.layerwise_decay,
        r.optim.patch_embed_lr_mult,
        r.optim.beta1,
        r.optim.beta2,
    ) == (
        o["epochs"],
        o["weight_decay"],
        o["weight_decay_end"],
        o["base_lr"],
        o["warmup_epochs"],
        o["min_lr"],
        o["clip_grad"],
        o["freeze_last_layer_epochs"],
        o["layerwise_decay"],
        o["patch_embed_lr_mult"],
        o["adamw_beta1"],
        o["adamw_beta2"],
    )
    assert (r.batch_size, r.epoch_length) == (c["train"]["batch_size_per_gpu"], c["train"]["OFFICIAL_EPOCH_LENGTH"])
    # the default file says patch 16; the released /14 models override it (their train yamls
    # are not in this package)
    assert r.backbone.layerscale_init == c["student"]["layerscale"] and r.backbone.patch_size == 14


# ---------------------------------------------------------------- one student/teacher step


def _step_recipe(centering: str):
    base = tiny()
    return replace(
        base,
        backbone=replace(base.backbone, num_register_tokens=0),  # no registers upstream
        loss=replace(base.loss, centering=centering),
    )


def _official_models(meta: MetaArch):
    """Official student and teacher (backbone + DINOHead) holding lvd's weights."""

    def build(side: dict) -> torch.nn.ModuleDict:
        bb = side["backbone"]
        vit = DinoVisionTransformer(
            img_size=SIZE,
            patch_size=PATCH,
            embed_dim=bb.embed_dim,
            depth=len(bb.blocks),
            num_heads=bb.config.num_heads,
            init_values=1.0,
            block_chunks=0,
            block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        )
        vit.load_state_dict(bb.state_dict())
        h = meta.recipe.dino_head
        head = OfficialHead(
            bb.embed_dim, h.n_prototypes, nlayers=h.n_layers, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim
        )
        sd = {k: v for k, v in side["dino_head"].state_dict().items() if k != "last_layer.weight"}
        v = side["dino_head"].state_dict()["last_layer.weight"]
        head.load_state_dict({**sd, "last_layer.weight_v": v, "last_layer.weight_g": torch.ones(v.shape[0], 1)})
        return torch.nn.ModuleDict({"backbone": vit, "dino_head": head})

    return build(meta.student), build(meta.teacher).requires_grad_(False).eval()


def official_step(student, teacher, losses, batch: Batch, *, centering: str, teacher_temp: float):
    """`SSLMetaArch.forward_backward` (April 2023) on CPU, shared head, line by line."""
    dino_loss, ibot_loss, koleo_loss = losses
    n_global, n_local = 2, batch.n_local
    masks, idx, n_masked = batch.masks, batch.mask_indices, batch.n_masked
    n_local_terms, n_global_terms = max(n_local * n_global, 1), (n_global - 1) * n_global
    with torch.no_grad():
        out = teacher["backbone"](batch.global_crops, is_training=True)
        cls = torch.cat(out["x_norm_clstoken"].chunk(n_global)[::-1])  # A meets B
        patches = out["x_norm_patchtokens"].flatten(0, 1)[idx]
        t_cls, t_patch = teacher["dino_head"](cls), teacher["dino_head"](patches)
        K = t_cls.shape[1]
        if centering == "centering":
            t_dino = dino_loss.softmax_center_teacher(t_cls, teacher_temp=teacher_temp).view(n_global, -1, K)
            dino_loss.update_center(t_cls)
            t_ibot = ibot_loss.softmax_center_teacher(t_patch.unsqueeze(0), teacher_temp=teacher_temp).squeeze(0)
            ibot_loss.update_center(t_patch.unsqueeze(0))
        else:
            t_dino = dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp=teacher_temp).view(n_global, -1, K)
            t_ibot = ibot_loss.sinkhorn_knopp_teacher(
                t_patch, teacher_temp=teacher_temp, n_masked_patches_tensor=torch.tensor([n_masked])
            )
    glob = student["backbone"](batch.global_crops, masks=masks, is_training=True)
    loc = student["backbone"](batch.local_crops, is_training=True)
    s_loc = student["dino_head"](loc["x_norm_clstoken"])
    s_glob = student["dino_head"](glob["x_norm_clstoken"])
    s_patch = student["dino_head"](glob["x_norm_patchtokens"].flatten(0, 1)[idx])
    dino = dino_loss(list(s_loc.chunk(n_local)), t_dino) / (n_global_terms + n_local_terms)
    dino = dino + dino_loss([s_glob], [t_dino.flatten(0, 1)]) * 2 / (n_global_terms + n_local_terms)
    koleo = 0.1 * sum(koleo_loss(p) for p in glob["x_norm_clstoken"].chunk(2))
    ibot = (
        ibot_loss.forward_masked(
            s_patch, t_ibot, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=batch.mask_weights
        )
        * 2
        * (1.0 / n_global)
    )
    total = dino + koleo + ibot
    total.backward()
    return {"total": total, "dino": dino, "koleo": koleo, "ibot": ibot}


def _batch(n_images: int = 6) -> Batch:
    torch.manual_seed(20)
    masks = torch.from_numpy(
        BlockMaskGenerator.from_config((4, 4), MaskingConfig()).sample_masks(2 * n_images, rng=np.random.default_rng(3))
    )
    n = masks.sum(1, keepdim=True).clamp(min=1).float()
    return Batch(
        global_crops=torch.randn(2 * n_images, 3, SIZE, SIZE),
        local_crops=torch.randn(2 * n_images, 3, 28, 28),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1 / n).expand_as(masks)[masks],
        mask_upperbound=int(masks.sum()),
        n_global=2,
        n_local=2,
        n_images=n_images,
    )


def _official_update_teacher(student, teacher, m: float) -> None:
    """`SSLMetaArch.update_teacher` without FSDP: the same foreach formula on the parameters."""
    with torch.no_grad():
        s = [p for k in ("backbone", "dino_head") for p in student[k].parameters()]
        t = [p for k in ("backbone", "dino_head") for p in teacher[k].parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1 - m)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_one_student_teacher_step_matches_the_official_step(centering, one_rank_group):
    torch.manual_seed(0)
    meta = MetaArch(_step_recipe(centering)).train()
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in meta.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student, teacher = _official_models(meta)
    student.train()
    K = meta.recipe.dino_head.n_prototypes
    losses = (OfficialDINOLoss(K), OfficialiBOTLoss(K), OfficialKoLeo())
    batch = _batch()
    ref = official_step(student, teacher, losses, batch, centering=centering, teacher_temp=0.06)
    out = meta.step(batch, teacher_temp=0.06).losses
    out.total.backward()
    for name in ("dino", "ibot"):
        torch.testing.assert_close(getattr(out, name), ref[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(meta.recipe.loss.koleo_weight * out.koleo, ref["koleo"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.total, ref["total"], atol=1e-5, rtol=1e-5)
    if centering == "centering":
        losses[0].apply_center_update()
        losses[1].apply_center_update()
        torch.testing.assert_close(meta.dino_loss.center, losses[0].center)
        torch.testing.assert_close(meta.ibot_loss.center, losses[1].center.view(1, K))

    theirs = dict(student.named_parameters())
    for name, p in meta.student.named_parameters():
        key = name.replace("last_layer.weight", "last_layer.weight_v")
        torch.testing.assert_close(p.grad, theirs[key].grad, atol=2e-5, rtol=1e-3, msg=name)

    with torch.no_grad():  # the same optimizer move on both sides, then the EMA
        for name, p in meta.student.named_parameters():
            key = name.replace("last_layer.weight", "last_layer.weight_v")
            p.sub_(0.1 * p.grad)
            theirs[key].copy_(p)
    meta.update_teacher(0.9)
    _official_update_teacher(student, teacher, 0.9)
    for name, p in meta.teacher.named_parameters():
        key = name.replace("last_layer.weight", "last_layer.weight_v")
        torch.testing.assert_close(p, dict(teacher.named_parameters())[key], msg=name)
