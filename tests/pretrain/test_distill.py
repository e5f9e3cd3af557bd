"""Distillation from a frozen teacher: the teacher gives the targets and never moves, the
student sees unmasked crops and learns, the EMA of the student is what the checkpoints hold,
pairs and missing teachers are refused, and the CLI runs it end to end on CPU."""

import json
from dataclasses import replace

import pytest
import torch

from lvd.cli.main import main
from lvd.datasets import load_fashion_mnist, write_shards
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.data import MaskingConfig, MultiCropConfig, make_dataloader
from lvd.pretrain.distill import distilled, load_frozen_teacher
from lvd.pretrain.init import InitMismatchError
from lvd.pretrain.parallel import setup_runtime
from lvd.pretrain.recipes import get_recipe, tiny
from lvd.pretrain.schedules import build_schedules
from lvd.pretrain.train import TrainConfig, _build, _train_step, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images, _ = load_fashion_mnist("test")
    out = tmp_path_factory.mktemp("shards")
    return tuple(str(p) for p in write_shards(images[:64], out, samples_per_shard=32, size=56))


def _short(r):
    return replace(r, batch_size=8, epochs=4, epoch_length=5, log_every=1, checkpoint_every=50)


def _teacher_run(shards, out, arch):
    r = _short(tiny())
    r = replace(r, backbone=replace(r.backbone, arch=arch))
    train(TrainConfig(shards=shards, recipe=r, out=out, max_steps=2, num_workers=0, pictures=False, seed=5))
    return out


@pytest.fixture(scope="module")
def wide_teacher(shards, tmp_path_factory):
    """A ViT-S trained 2 steps with `tiny`'s heads and crops: the wider teacher of tiny_distill."""
    return _teacher_run(shards, tmp_path_factory.mktemp("teacher") / "run", "vit_small")


@pytest.fixture(scope="module")
def same_teacher(shards, tmp_path_factory):
    """A `tiny` run: a teacher of the student's own shape (an EMA mix-up would not fail on shapes)."""
    return _teacher_run(shards, tmp_path_factory.mktemp("teacher") / "run", "vit_tiny")


def _batches(recipe, shards, n):
    c, m = recipe.crops, recipe.masks
    loader = make_dataloader(
        list(shards),
        batch_size=recipe.batch_size,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        crops=MultiCropConfig(
            global_size=c.global_size,
            local_size=c.local_size,
            n_local=c.n_local,
            global_scale=c.global_scale,
            local_scale=c.local_scale,
        ),
        masking=MaskingConfig(
            sample_probability=m.sample_probability,
            ratio_min=m.ratio_min,
            ratio_max=m.ratio_max,
            patch_size=recipe.backbone.patch_size,
        ),
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("which", ["wide", "same"])
def test_frozen_teacher_is_loaded_and_never_moves_while_the_student_learns(shards, which, request):
    teacher = request.getfixturevalue(f"{which}_teacher")
    arch = "vit_small" if which == "wide" else "vit_tiny"
    recipe = _short(
        replace(
            get_recipe("tiny_distill"),
            distill=replace(get_recipe("tiny_distill").distill, teacher=str(teacher), teacher_arch=arch),
        )
    )
    frozen = load_frozen_teacher(recipe)
    assert frozen.report.heads.startswith("from ") and frozen.report.fresh == []
    torch.manual_seed(0)
    rt = setup_runtime("cpu")
    meta, optimizer = _build(recipe, rt, frozen=frozen)
    loaded = _state(meta.frozen_teacher)
    for key, value in frozen.tensors.items():
        assert torch.equal(loaded[key], value), key
    saved = {"teacher": {k: torch.empty_like(v) for k, v in meta.frozen_teacher.state_dict().items()}}
    ckpt._dcp_load(saved, ckpt.latest_checkpoint(teacher))  # the run's teacher, as saved
    for key, value in saved["teacher"].items():
        assert torch.equal(loaded[key], value), key

    student0, ema0 = _state(meta.student), _state(meta.teacher)
    schedules = build_schedules(recipe.schedule_config())
    meta.train()
    for step, batch in enumerate(_batches(recipe, shards, 4)):
        out = _train_step(meta, optimizer, batch, schedules.at(step + 5), step, rt)  # past warmup
        assert torch.isfinite(out.losses.total)
        assert out.losses.ibot > 0  # iBOT targets from the teacher at the sampled positions
    for key, value in _state(meta.frozen_teacher).items():
        assert torch.equal(value, loaded[key]), f"frozen teacher moved: {key}"
    assert not meta.frozen_teacher.training and not any(p.requires_grad for p in meta.frozen_teacher.parameters())
    moved = [k for k, v in _state(meta.student).items() if not torch.equal(v, student0[k])]
    assert "backbone.blocks.0.attn.qkv.weight" in moved
    # the EMA of the student (the released model) moves towards it
    assert not torch.equal(_state(meta.teacher)["backbone.cls_token"], ema0["backbone.cls_token"])


def test_targets_come_from_the_frozen_teacher_and_the_student_sees_whole_crops(shards, wide_teacher):
    recipe = _short(distilled(tiny(), wide_teacher))
    torch.manual_seed(0)
    meta, _ = _build(recipe, setup_runtime("cpu"), frozen=load_frozen_teacher(recipe))
    (batch,) = _batches(recipe, shards, 1)
    assert batch.masks.any()
    meta.eval()
    before = meta.teacher_targets(batch, 0.07).dino_probs_GBK
    with torch.no_grad():  # scramble the EMA teacher: the targets must not change
        for p in meta.teacher.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(meta.teacher_targets(batch, 0.07).dino_probs_GBK, before)
    with torch.no_grad():
        meta.frozen_teacher["backbone"].norm.weight.mul_(3.0)
    assert not torch.allclose(meta.teacher_targets(batch, 0.07).dino_probs_GBK, before)
    with torch.no_grad():
        student = meta.student_outputs(batch).global_cls_GBD.flatten(0, 1)
        unmasked = meta.student["backbone"](batch.global_crops).cls_BD
    torch.testing.assert_close(student, unmasked, rtol=0, atol=0)


def test_pairs_and_missing_teachers_are_refused(shards, wide_teacher, tmp_path):
    r = get_recipe("vits14_distill")
    assert r.distill.teacher_arch == "vit_giant2" and r.backbone.drop_path_rate == 0.0
    assert r.dino_head == get_recipe("vitg14").dino_head and r.loss.separate_ibot_head
    with pytest.raises(InitMismatchError, match="distils from a vit_giant2 teacher .*384 wide, 12 deep"):
        load_frozen_teacher(_short(replace(r, distill=replace(r.distill, teacher=str(wide_teacher)))))
    bad_patch = _short(distilled(tiny(), wide_teacher))
    bad_patch = replace(bad_patch, backbone=replace(bad_patch.backbone, patch_size=7))
    with pytest.raises(InitMismatchError, match="same"):
        load_frozen_teacher(bad_patch)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--shards", *shards, "--recipe", "tiny_distill", "--out", str(tmp_path / "o")])
    assert "--distill-from SPEC" in str(e.value) and "\n" not in str(e.value)


def test_cli_distils_on_cpu_and_reports_the_teacher(shards, wide_teacher, tmp_path):
    out = tmp_path / "student"
    rc = main(
        [
            "pretrain",
            "--shards",
            *shards,
            "--recipe",
            "tiny_distill",
            "--out",
            str(out),
            "--distill-from",
            str(wide_teacher),
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    report = json.loads((out / "distill.json").read_text())
    assert report["spec"] == str(wide_teacher) and report["heads"].startswith("from ")
    config = json.loads((out / "config.json").read_text())
    assert config["distill"] == {"teacher": str(wide_teacher), "teacher_arch": "vit_small"}
    # the checkpoint's teacher is the student's EMA: ViT-Tiny, not the ViT-S teacher
    assert ckpt.load_teacher_backbone(out).embed_dim == 192
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)


def test_two_ranks_get_the_frozen_teacher_and_the_init_weights_of_rank_0(same_teacher, tmp_path):
    from tests.pretrain.test_fsdp import torchrun

    torchrun(2, "build_distill.py", tmp_path / "built", same_teacher, same_teacher)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"built-rank{rank}.json").read_text())
        assert got["frozen_bad"] == [] and got["student_bad"] == [] and min(got["n"]) > 90, got
