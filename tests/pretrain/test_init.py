"""`--init SPEC`: a run started from an official-layout file, an lvd run, or a mismatched file.

The official files are written by `tests/pretrain/test_official.official_state_dict` (the
official key layout, written out by hand from facebookresearch/dinov2), here at ViT-Tiny
width and depth so that the `tiny` recipe fits them."""

import json
from dataclasses import replace

import pytest
import torch

from lvd.cli.main import main
from lvd.datasets import load_fashion_mnist, write_shards
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.init import InitMismatchError, apply_start, init_weights
from lvd.pretrain.meta_arch import MetaArch
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.recipes import tiny
from lvd.pretrain.train import TrainConfig, train
from tests.pretrain import test_official


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images, _ = load_fashion_mnist("test")
    out = tmp_path_factory.mktemp("shards")
    return tuple(str(p) for p in write_shards(images[:64], out, samples_per_shard=32, size=56))


def official_file(path, *, width=192, depth=6, grid=4, registers=4, seed=0):
    """An official-layout .pth at ViT-Tiny size (`official_state_dict` reads D/DEPTH/GRID)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_official, "D", width)
        mp.setattr(test_official, "DEPTH", depth)
        mp.setattr(test_official, "GRID", grid)
        sd = test_official.official_state_dict(registers=registers, seed=seed)
    torch.save(sd, path)
    return sd


def _recipe():
    r = tiny()
    return replace(r, batch_size=8, epochs=4, epoch_length=5, log_every=1, checkpoint_every=50)


def test_official_file_gives_bit_identical_backbones_at_step_0(tmp_path):
    sd = official_file(tmp_path / "official.pth")
    start = init_weights(tmp_path / "official.pth", _recipe())
    torch.manual_seed(0)
    meta = MetaArch(_recipe())
    apply_start(meta, start)
    for part in (meta.student, meta.teacher):
        got = part["backbone"].state_dict()
        assert set(got) == set(sd)
        for key, value in sd.items():
            assert torch.equal(got[key], value), key
    r = start.report
    assert sorted(r.loaded) == sorted(f"backbone.{k}" for k in sd)
    assert r.resized == {} and r.heads.startswith("fresh")
    assert r.fresh and all(k.startswith("dino_head.") for k in r.fresh)


def test_training_from_an_official_file_starts_from_it_and_stays_finite(shards, tmp_path):
    sd = official_file(tmp_path / "official.pth")
    # Step 0 runs at lr 0 (warmup) and teacher momentum 1: the weights cannot move, so the
    # teacher saved after it must be the file's tensors bit for bit, through the whole CLI.
    rc = main(
        [
            "pretrain",
            "--shards",
            *shards,
            "--recipe",
            "tiny",
            "--out",
            str(tmp_path / "a"),
            "--init",
            str(tmp_path / "official.pth"),
            "--max-steps",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--set",
            "teacher.momentum=1.0",
        ]
    )
    assert rc == 0
    saved = load_backbone(tmp_path / "a").state_dict()
    for key, value in sd.items():
        assert torch.equal(saved[key], value), key
    report = json.loads((tmp_path / "a" / "init.json").read_text())
    assert report["spec"] == str(tmp_path / "official.pth") and "backbone.cls_token" in report["loaded"]

    result = train(
        TrainConfig(
            shards=shards,
            recipe=_recipe(),
            out=tmp_path / "b",
            max_steps=20,
            init=str(tmp_path / "official.pth"),
            num_workers=0,
            pictures=False,
        )
    )
    assert len(result.losses) == 20
    assert all(torch.isfinite(torch.tensor(list(x.values()))).all() for x in result.losses)


def test_pos_embed_on_another_grid_is_resized_and_missing_registers_start_fresh(tmp_path):
    sd = official_file(tmp_path / "big.pth", grid=8, registers=0)  # 112 px native grid
    start = init_weights(tmp_path / "big.pth", _recipe())
    source = load_backbone(tmp_path / "big.pth")
    with torch.no_grad():
        expected = source.interpolate_pos_embed(4, 4)
    assert torch.equal(start.tensors["backbone.pos_embed"], expected)
    assert start.report.resized == {"backbone.pos_embed": [[1, 65, 192], [1, 17, 192]]}
    assert "backbone.register_tokens" in start.report.fresh
    assert torch.equal(start.tensors["backbone.blocks.5.mlp.fc2.weight"], sd["blocks.5.mlp.fc2.weight"])


def test_shape_mismatch_is_refused_naming_tensor_shapes_and_flags(tmp_path):
    official_file(tmp_path / "narrow.pth", width=128, depth=3)
    with pytest.raises(InitMismatchError) as e:
        init_weights(tmp_path / "narrow.pth", _recipe())
    msg = str(e.value)
    assert "cls_token: SPEC (1, 1, 128) vs recipe (1, 1, 192)" in msg
    assert "SPEC is a 128-wide, 3-deep mlp ViT" in msg
    assert "--set backbone.num_register_tokens=4" in msg and "\n" not in msg


def test_cli_refuses_a_mismatched_init_in_one_line(shards, tmp_path):
    official_file(tmp_path / "narrow.pth", width=128, depth=3)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "pretrain",
                "--shards",
                *shards,
                "--recipe",
                "tiny",
                "--out",
                str(tmp_path / "o"),
                "--init",
                str(tmp_path / "narrow.pth"),
                "--max-steps",
                "1",
                "--num-workers",
                "0",
            ]
        )
    msg = str(e.value)
    assert msg.startswith("lvd pretrain: error:") and "cls_token" in msg and "\n" not in msg


def test_init_from_an_lvd_run_takes_its_teacher_backbone_and_heads(shards, tmp_path):
    first = train(
        TrainConfig(
            shards=shards, recipe=_recipe(), out=tmp_path / "a", max_steps=2, num_workers=0, pictures=False, seed=3
        )
    )
    state = {"teacher": dict(MetaArch(_recipe()).teacher.state_dict())}
    ckpt._dcp_load(state, first.last_checkpoint)  # the run's teacher, as saved
    start = init_weights(tmp_path / "a", _recipe())
    assert start.report.heads.startswith("from ") and start.report.fresh == []
    torch.manual_seed(0)
    meta = MetaArch(_recipe())
    apply_start(meta, start)
    for part in (meta.student, meta.teacher):
        got = part.state_dict()
        for key, value in state["teacher"].items():
            assert torch.equal(got[key], value), key


def test_init_from_an_hf_folder_loads_its_backbone(tmp_path):
    from lvd.pretrain.models.hf import export_hf

    torch.manual_seed(7)
    source = _recipe().backbone.build(img_size=56)
    export_hf(source, tmp_path / "hf")
    start = init_weights(tmp_path / "hf", _recipe())
    assert start.report.heads.startswith("fresh") and not start.report.resized
    assert not any(k.startswith("backbone.") for k in start.report.fresh)
    for key, value in source.state_dict().items():
        assert torch.equal(start.tensors[f"backbone.{key}"], value), key
