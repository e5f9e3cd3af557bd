"""`load_backbone` dispatch: HF folder, official .pth (see test_official.py), lvd checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lvd.pretrain.checkpoint import CheckpointMeta, save_checkpoint
from lvd.pretrain.models.hf import export_hf
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.recipes import tiny


def test_lvd_run_folder_gives_the_teacher_backbone(tmp_path):
    recipe = tiny()
    torch.manual_seed(0)
    teacher = recipe.backbone.build(img_size=recipe.crops.global_size)
    student = recipe.backbone.build(img_size=recipe.crops.global_size)
    state = {
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "student": {f"backbone.{k}": v for k, v in student.state_dict().items()},
    }
    meta = CheckpointMeta(step=3, data_batches=3, world_size=1, recipe=recipe.to_dict())
    ckpt = save_checkpoint(tmp_path, state, meta, keep=1)
    # A real run's --out folder also holds its recipe as config.json (not an HF config).
    (tmp_path / "config.json").write_text(json.dumps(recipe.to_dict()))
    for spec in (tmp_path, ckpt, str(ckpt)):  # run --out folder, checkpoint dir, string
        loaded = load_backbone(spec)
        assert not loaded.training
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in teacher.state_dict().items())


def test_hf_folder_and_missing_checkpoint(tmp_path):
    recipe = tiny()
    model = recipe.backbone.build(img_size=recipe.crops.global_size)
    export_hf(model, tmp_path / "hf")
    loaded = load_backbone(tmp_path / "hf")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_backbone(tmp_path / "empty")
