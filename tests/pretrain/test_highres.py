"""High-resolution phase: a tiny run continued at larger global crops (CPU, one process).

The phase's step-0 weights equal the run's (student and teacher, heads, centres; teacher
against the backbone the run gathered into safetensors), its position embeddings are the
run's interpolated by the official formula, a few steps train without NaN, and the recipe
the phase flag builds follows DINOv2's description (518 px, 10k iterations, lower lr)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain import highres
from lvd.pretrain.overrides import resolve_recipe
from lvd.pretrain.parallel import setup_runtime
from lvd.pretrain.recipes import BackboneConfig, Recipe
from lvd.pretrain.train import TrainConfig, _build, _restore, train
from pretrain.test_fsdp import SCRIPTS, shards, torchrun  # noqa: F401 -- `shards` is a fixture

RUN_STEPS, PHASE_STEPS, PHASE_SIZE = 2, 3, 84  # tiny: 56 px (4x4 patches) -> 84 px (6x6)


def _test_recipe() -> Recipe:
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_train", SCRIPTS / "run_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.test_recipe()


def _config(shards, recipe, out, steps) -> TrainConfig:  # noqa: F811
    return TrainConfig(
        shards=tuple(shards),
        recipe=recipe,
        out=out,
        max_steps=steps,
        num_workers=0,
        seed=0,
        deterministic=True,
        pictures=False,
    )


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("highres") / "run"
    train(_config(shards, _test_recipe(), out, RUN_STEPS))
    return out


def _phase_recipe(run: Path, *sets: str) -> Recipe:
    config, all_sets = highres.highres_overrides(run, None, list(sets))
    return resolve_recipe("tiny", config=config, sets=all_sets)


def test_the_flag_builds_dinov2s_high_resolution_phase(run):
    base = _test_recipe()
    phase = _phase_recipe(run)
    assert phase.crops.global_size == 518 == 37 * 14
    assert phase.total_iters == base.epochs * phase.epoch_length == 10_000  # 4 epochs of 2500
    assert phase.optim.base_lr == pytest.approx(base.optim.base_lr / 10)
    assert (phase.phase.from_run, phase.name) == (str(run.resolve()), "tiny_highres")
    same = ("backbone", "dino_head", "ibot_head", "loss", "masks", "teacher", "batch_size", "epochs")
    assert all(getattr(phase, f) == getattr(base, f) for f in same)
    # the user's --set comes last; --config is refused (the run's config.json is the base)
    assert _phase_recipe(run, f"crops.global_size={PHASE_SIZE}").crops.global_size == PHASE_SIZE
    with pytest.raises(ValueError, match="takes the run's own config.json"):
        highres.highres_overrides(run, "other.yaml", [])


def _official_interpolation(pos_1TD: torch.Tensor, grid: int) -> torch.Tensor:
    """dinov2's interpolate_pos_encoding for a square grid: bicubic, scale (grid + 0.1) / M."""
    M = int((pos_1TD.shape[1] - 1) ** 0.5)
    patches = pos_1TD[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    out = F.interpolate(patches, scale_factor=((grid + 0.1) / M, (grid + 0.1) / M), mode="bicubic")
    return torch.cat([pos_1TD[:, :1], out.flatten(2).transpose(1, 2)], dim=1)


def test_phase_starts_from_the_runs_weights_and_trains(run, shards, tmp_path):  # noqa: F811
    recipe = _phase_recipe(run, f"crops.global_size={PHASE_SIZE}")
    out = tmp_path / "phase"
    rt = setup_runtime("cpu")
    # what train() builds at step 0 of the phase: the same two calls
    start = highres.start_of_run(recipe, init=None, rank=0, resuming=False, out=out)
    torch.manual_seed(123)  # another seed than the run's: nothing may come from the init
    meta, _ = _build(recipe, rt, phase=start)
    report = json.loads((out / "phase.json").read_text())
    assert report["resized"] == {
        f"{p}.backbone.pos_embed": [[1, 17, 192], [1, 37, 192]] for p in ("student", "teacher")
    }

    # the run's own state, restored the way a resume does (not the phase's reader)
    saved_recipe = _test_recipe()
    saved, saved_opt = _build(saved_recipe, rt)
    _restore(saved, saved_opt, ckpt.latest_checkpoint(run))
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        mine, theirs = getattr(meta, part).state_dict(), getattr(saved, part).state_dict()
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            if not key.endswith("pos_embed"):
                torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=f"{part}.{key}")
    # the teacher also against the backbone gathered when the run saved (safetensors)
    written = load_file(str(ckpt.latest_checkpoint(run) / ckpt.BACKBONE_WEIGHTS))
    teacher = meta.teacher["backbone"].state_dict()
    for key, value in written.items():
        if key != "pos_embed":
            torch.testing.assert_close(teacher[key], value, rtol=0, atol=0, msg=key)
    # position embeddings: the run's 4x4 grid interpolated to 6x6 by the official formula
    torch.testing.assert_close(teacher["pos_embed"], _official_interpolation(written["pos_embed"], 6))
    student_pos = saved.student["backbone"].pos_embed.detach()
    torch.testing.assert_close(meta.student["backbone"].pos_embed.detach(), _official_interpolation(student_pos, 6))

    # the phase trains: finite losses at 84 px, its checkpoint records the phase recipe
    result = train(_config(shards, recipe, out, PHASE_STEPS))
    assert (result.start_step, result.end_step) == (0, PHASE_STEPS)
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in result.losses)
    meta_json = ckpt.read_meta(result.last_checkpoint)
    assert Recipe.from_dict(meta_json.recipe) == recipe
    assert ckpt.load_teacher_backbone(out).native_grid == 6


def test_a_phase_of_another_architecture_is_refused(run):
    recipe = _phase_recipe(run, f"crops.global_size={PHASE_SIZE}")
    wider = replace(recipe, backbone=BackboneConfig(arch="vit_small", drop_path_rate=0.0))
    with pytest.raises(highres.PhaseMismatchError, match="other backbone than this recipe"):
        highres.phase_start(wider)
    # every rank refuses (not only rank 0, which loads): none waits in a collective
    with pytest.raises(highres.PhaseMismatchError):
        highres.start_of_run(wider, init=None, rank=1, resuming=False, out=Path("/nowhere"))
    with pytest.raises(ValueError, match="both give the start weights"):
        highres.start_of_run(recipe, init="some.pth", rank=0, resuming=False, out=Path("/nowhere"))
    assert highres.start_of_run(recipe, init=None, rank=0, resuming=True, out=Path("/nowhere")) is None


def test_phase_on_two_ranks_starts_from_rank0s_read_of_the_run(run, shards, tmp_path):  # noqa: F811
    """Only rank 0 reads the run (a DCP read of its own, no collective); FSDP2 broadcasts. The
    gathered step-0 state equals the one-process phase start, and the phase trains."""
    out = tmp_path / "phase2"
    torchrun(2, "run_highres.py", run, out, PHASE_SIZE, *shards)
    recipe = _phase_recipe(run, f"crops.global_size={PHASE_SIZE}")
    want = highres.phase_start(recipe).tensors
    got = torch.load(out / "phase-start-w2.pt", weights_only=True)
    assert set(got) == {f"{p}.{k}" for p in ("student", "teacher") for k in want[p]}
    for key, value in got.items():
        part, name = key.split(".", 1)
        torch.testing.assert_close(value, want[part][name], rtol=0, atol=0, msg=key)
    for rank in (0, 1):
        losses = json.loads((out / f"losses-rank{rank}.json").read_text())
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in losses)
