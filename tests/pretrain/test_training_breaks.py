"""Tests that fail when a training step is quietly broken (each break was tried; notes/15c.md).

Each of these once went unnoticed with the suite green: a teacher that is a plain copy of the
student, KoLeo dropped from the total, local crops carrying no gradient, another position
interpolation formula, a reported k-NN that is not the checkpoint's, a FLOP count that is off.
References are computed here, independently of the code under test: the EMA formula on the
checkpointed weights, each loss term from the (parity-tested) loss modules, the official
DINOv2 interpolation code, a k-NN written out in this file, an analytic ViT FLOP count.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dinov2.models.vision_transformer import DinoVisionTransformer
from PIL import Image

from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import checkpoint_dir, load_checkpoint
from lvd.pretrain.data.collate import Batch
from lvd.pretrain.data.masking import BlockMaskGenerator, MaskingConfig
from lvd.pretrain.losses import KoLeoLoss
from lvd.pretrain.losses.sinkhorn import sinkhorn_knopp
from lvd.pretrain.meta_arch import MetaArch
from lvd.pretrain.recipes import Recipe, tiny
from lvd.pretrain.schedules import build_schedules
from lvd.pretrain.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


def small_recipe() -> Recipe:
    """`tiny` at batch 8 with a checkpoint per step, and no warm-up: the student moves at once."""
    base = tiny()
    return replace(
        base,
        batch_size=8,
        checkpoint_every=1,
        keep_checkpoints=3,
        log_every=1,
        optim=replace(base.optim, warmup_epochs=0, base_lr=0.1),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("breaks-data")
    x, y = load_fashion_mnist("test")
    write_shards(x[:64], root / "shards", samples_per_shard=32, size=56)
    write_labelled_folder(x[100:160], y[100:160], root / "knn-train", size=56)
    write_labelled_folder(x[200:240], y[200:240], root / "knn-val", size=56)
    shards = tuple(sorted(str(p) for p in (root / "shards").glob("*.tar")))
    return SimpleNamespace(root=root, shards=shards, train=root / "knn-train", val=root / "knn-val")


def _load_models(ckpt: Path, recipe: Recipe) -> MetaArch:
    meta = MetaArch(recipe)
    state = {"student": meta.student.state_dict(), "teacher": meta.teacher.state_dict()}
    load_checkpoint(ckpt, state, optional=())
    meta.student.load_state_dict(state["student"])
    meta.teacher.load_state_dict(state["teacher"])
    return meta


# ---------------------------------------------------------------- (a) the teacher EMA


def test_one_step_teacher_is_the_exact_ema_of_the_student(data, tmp_path):
    """t_{k+1} = m_k t_k + (1 - m_k) s_{k+1}, read off two consecutive checkpoints of a run."""
    recipe = small_recipe()
    train(TrainConfig(shards=data.shards, recipe=recipe, out=tmp_path, max_steps=2, pictures=False))
    before, after = (_load_models(checkpoint_dir(tmp_path, s), recipe) for s in (1, 2))
    m = build_schedules(recipe.schedule_config()).at(1).momentum
    assert 0.9 < m < 1.0
    moved = 0.0
    for (name, t0), t1, s1 in zip(
        before.teacher.state_dict().items(), after.teacher.state_dict().values(), after.student.state_dict().values()
    ):
        expected = m * t0 + (1 - m) * s1
        torch.testing.assert_close(t1, expected, atol=1e-7, rtol=1e-6, msg=name)
        moved = max(moved, float((s1 - t1).abs().max()))
    assert moved > 1e-4  # the student really differs from the teacher: the check has teeth


# ---------------------------------------------------------------- (b), (c) one step's losses


def _batch(recipe: Recipe, n_images: int = 6) -> Batch:
    g = torch.Generator().manual_seed(0)
    c, grid = recipe.crops, recipe.crops.global_size // recipe.backbone.patch_size
    masks = torch.from_numpy(
        BlockMaskGenerator.from_config((grid, grid), MaskingConfig()).sample_masks(
            2 * n_images, rng=np.random.default_rng(0)
        )
    )
    n = masks.sum(1, keepdim=True).clamp(min=1).float()
    return Batch(
        global_crops=torch.randn(2 * n_images, 3, c.global_size, c.global_size, generator=g),
        local_crops=torch.randn(c.n_local * n_images, 3, c.local_size, c.local_size, generator=g),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1 / n).expand_as(masks)[masks],
        mask_upperbound=int(masks.sum()),
        n_global=2,
        n_local=c.n_local,
        n_images=n_images,
    )


def test_total_loss_is_the_weighted_sum_of_the_loss_modules():
    """Every term recomputed from the student's and teacher's outputs with the loss modules
    the parity tests check against the official ones (Sinkhorn teacher: no state to share)."""
    torch.manual_seed(0)
    recipe = tiny()
    meta = MetaArch(recipe).train()
    batch = _batch(recipe)
    temp = 0.05
    out = meta.step(batch, teacher_temp=temp).losses

    G, B, idx = batch.n_global, batch.n_images, batch.mask_indices
    with torch.no_grad():
        t = meta.teacher["backbone"](batch.global_crops)
        t_dino = sinkhorn_knopp(meta.teacher["dino_head"](t.cls_BD), temp).view(G, B, -1)
        t_ibot = sinkhorn_knopp(meta.teacher["dino_head"](t.patches_BND.flatten(0, 1)[idx]), temp)
        s = meta.student["backbone"](batch.global_crops, masks_BN=batch.masks)
        s_loc = meta.student["backbone"](batch.local_crops)
        head = meta.student["dino_head"]
        dino = meta.dino_loss(head(s.cls_BD).view(G, B, -1), head(s_loc.cls_BD).view(batch.n_local, B, -1), t_dino)
        ibot = meta.ibot_loss(head(s.patches_BND.flatten(0, 1)[idx]), t_ibot, batch.mask_weights, n_crops=G * B)
        koleo = sum(KoLeoLoss()(c) for c in s.cls_BD.view(G, B, -1))
    w = recipe.loss
    for name, ref in (("dino", dino), ("ibot", ibot), ("koleo", koleo)):
        torch.testing.assert_close(getattr(out, name).detach(), ref, atol=1e-5, rtol=1e-5, msg=name)
    assert abs(float(koleo)) > 0.01 and float(ibot) > 0.01  # each weight matters in the sum
    torch.testing.assert_close(
        out.total.detach(), w.dino_weight * dino + w.ibot_weight * ibot + w.koleo_weight * koleo, atol=1e-5, rtol=1e-5
    )


def test_local_crops_carry_gradient():
    torch.manual_seed(0)
    meta = MetaArch(tiny()).train()
    batch = _batch(meta.recipe)
    batch.local_crops.requires_grad_(True)
    batch.global_crops.requires_grad_(True)
    meta.step(batch, teacher_temp=0.05).losses.total.backward()
    assert batch.local_crops.grad is not None, "no gradient reaches the local crops"
    per_crop = batch.local_crops.grad.flatten(1).abs().sum(1)
    assert (per_crop > 0).all(), "some local crops give the student no gradient"
    assert float(per_crop.mean()) > 1e-3 * float(batch.global_crops.grad.flatten(1).abs().sum(1).mean())


# ---------------------------------------------------------------- (d) position interpolation


@pytest.mark.parametrize("hw", [(28, 28), (98, 98), (42, 70), (70, 28)])
def test_training_model_interpolates_a_random_position_field_like_the_official_code(hw):
    """The `tiny` student (registers, 56 px native) at local-crop and other sizes, against
    dinov2's `interpolate_pos_encoding` (offset 0.1) run on the same field."""
    torch.manual_seed(0)
    model = tiny().backbone.build(img_size=56)
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn_like(model.pos_embed))
    p = model.patch_size
    official = SimpleNamespace(pos_embed=model.pos_embed, patch_size=p)
    x = torch.zeros(1, 1 + (hw[0] // p) * (hw[1] // p), model.embed_dim)
    with torch.no_grad():
        ref = DinoVisionTransformer.interpolate_pos_encoding(official, x, hw[0], hw[1])
        got = model.interpolate_pos_embed(hw[0] // p, hw[1] // p)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- (e) the reported k-NN


def _features(meta: MetaArch, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher CLS of DIR/<class>/*.png (56 px already: normalise only), written out here."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    classes = sorted(d.name for d in folder.iterdir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).glob("*.png")):
            arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
            xs.append((torch.from_numpy(arr).permute(2, 0, 1) - mean[:, None, None]) / std[:, None, None])
            ys.append(label)
    with torch.no_grad():
        feats = meta.teacher["backbone"].eval()(torch.stack(xs)).cls_BD
    return F.normalize(feats, dim=1), torch.tensor(ys)


def _weighted_knn_top1(train_x, train_y, val_x, val_y, k: int = 20, temp: float = 0.07) -> float:
    correct = 0
    for q, y in zip(val_x, val_y):
        sims = train_x @ q
        top = sims.topk(k).indices
        votes = torch.zeros(int(train_y.max()) + 1).index_add_(0, train_y[top], (sims[top] / temp).exp())
        correct += int(votes.argmax() == y)
    return correct / len(val_y)


def test_reported_knn_is_the_checkpoints(data, tmp_path, prefect_harness):
    from lvd.flows.pretrain_flow import pretrain

    summary = pretrain(
        shards=list(data.shards),
        out=str(tmp_path / "run"),
        recipe="tiny",
        max_steps=2,
        batch_size=8,
        knn_train=str(data.train),
        knn_val=str(data.val),
    )
    ckpt = Path(summary.checkpoint)
    written = json.loads((ckpt / "eval_knn.json").read_text())
    meta = _load_models(ckpt, replace(tiny(), batch_size=8))
    top1 = _weighted_knn_top1(*_features(meta, data.train), *_features(meta, data.val))
    assert written["n_val"] == 40 and written["k"] == 20
    # float32 on the way (0.275 is stored as 0.2750000059...); one image is 1/40 = 0.025
    assert summary.knn_top1 == written["top1"] == pytest.approx(top1, abs=1e-6)


# ---------------------------------------------------------------- (f) the benchmark's FLOPs


def _vit_forward_flops(
    n: int, h: int, w: int, *, dim: int, depth: int, hidden: int, patch: int, registers: int
) -> float:
    """Matmul FLOPs (2 per multiply-add) of n images through the ViT: patch embedding, then per
    block qkv, scores, attention x values, projection and the two MLP layers."""
    tokens = 1 + registers + h * w
    embed = 2 * h * w * 3 * patch * patch * dim
    block = (
        2 * tokens * dim * 3 * dim
        + 2 * 2 * tokens * tokens * dim
        + 2 * tokens * dim * dim
        + 2 * 2 * tokens * dim * hidden
    )
    return n * (embed + depth * block)


def _head_flops(rows: int, dim: int, recipe: Recipe) -> float:
    hd = recipe.dino_head
    return (
        2
        * rows
        * (
            dim * hd.hidden_dim
            + hd.hidden_dim**2 * (hd.n_layers - 2)
            + hd.hidden_dim * hd.bottleneck_dim
            + hd.bottleneck_dim * hd.n_prototypes
        )
    )


def analytic_step_flops(recipe: Recipe, batch: Batch) -> float:
    """Teacher forward on the global crops, student forward on all crops, student backward
    = 2x its forward (no input gradient for the patch embedding: the images need none)."""
    bb = recipe.backbone.build(img_size=recipe.crops.global_size)
    cfg = bb.config
    vit = dict(
        dim=cfg.embed_dim,
        depth=cfg.depth,
        hidden=cfg.ffn_hidden_dim,
        patch=cfg.patch_size,
        registers=cfg.num_register_tokens,
    )
    g, loc = recipe.crops.global_size // cfg.patch_size, recipe.crops.local_size // cfg.patch_size
    G, L, B, M = batch.n_global, batch.n_local, batch.n_images, batch.n_masked
    global_fwd = _vit_forward_flops(G * B, g, g, **vit)
    local_fwd = _vit_forward_flops(L * B, loc, loc, **vit)
    teacher = global_fwd + _head_flops(G * B + M, cfg.embed_dim, recipe)
    student = global_fwd + local_fwd + _head_flops(G * B + L * B + M, cfg.embed_dim, recipe)
    embed_input_grad = 2 * (G * B * g * g + L * B * loc * loc) * 3 * cfg.patch_size**2 * cfg.embed_dim
    koleo = G * 2 * B * B * cfg.embed_dim
    return teacher + 3 * student - embed_input_grad + koleo


def _gpu_fsdp_module():
    spec = importlib.util.spec_from_file_location("gpu_fsdp", ROOT / "benchmarks" / "gpu_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_fsdp"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small"])
def test_benchmark_flops_are_within_10_percent_of_the_analytic_count(arch):
    """`benchmarks/gpu_fsdp.py` counts the FLOPs its MFU divides by; they must be the step's."""
    from lvd.pretrain.optim import build_student_optimizer
    from lvd.pretrain.parallel import Runtime

    bench = _gpu_fsdp_module()
    base = tiny()
    recipe = replace(base, backbone=replace(base.backbone, arch=arch), batch_size=4)
    if arch == "vit_small":  # 112 / 56 px: more tokens, so attention weighs in
        recipe = replace(recipe, crops=replace(recipe.crops, global_size=112, local_size=56))
    batch = bench.synthetic_batch(recipe, recipe.batch_size)
    torch.manual_seed(0)
    meta = MetaArch(recipe).train()
    optimizer = build_student_optimizer(dict(meta.student.items()), recipe.optim)
    values = build_schedules(recipe.schedule_config()).at(0)
    counted = bench.count_step_flops(meta, optimizer, batch, values, Runtime(torch.device("cpu"), 0, 1, None))
    expected = analytic_step_flops(recipe, batch)
    assert counted == pytest.approx(expected, rel=0.10), f"counted {counted / 1e9:.3f} vs {expected / 1e9:.3f} GFLOP"
