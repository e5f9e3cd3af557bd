"""Trust boundary: no pickle runs on checkpoints and model specs that users pass in.

A crafted run folder (its DCP `.metadata`, its RNG file, or a non-tensor value inside its
DCP shard, each a pickle whose payload creates a marker file) goes through every command that
takes a model and through `--resume`: the marker never appears and the error names the file
or the way out. Also: RNG state round-trips without pickle, and a crash while a checkpoint is
being published never loses the step that was there before.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lvd.cli.main import main
from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.checkpoint import (
    CheckpointMeta,
    LegacyCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_rng_state,
    save_checkpoint,
    save_rng_state,
    set_rng_state,
)
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.recipes import tiny

TRAIN = ["--recipe", "tiny", "--batch-size", "4", "--num-workers", "0"]


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards, an image folder, and a genuine 2-step `tiny` run (its checkpoint is the
    template the crafted folders are made from)."""
    root = tmp_path_factory.mktemp("sec")
    x, y = load_fashion_mnist("test")
    write_shards(x[:32], root / "shards", samples_per_shard=16, size=56)
    write_labelled_folder(x[100:104], y[100:104], root / "images", size=56)
    assert (
        main(["pretrain", "--shards", str(root / "shards"), "--out", str(root / "good"), "--max-steps", "2", *TRAIN])
        == 0
    )
    image = next((root / "images").rglob("*.png"))
    mask = root / "mask.png"
    from PIL import Image

    Image.fromarray(np.full((56, 56), 255, np.uint8)).save(mask)
    return {"root": root, "good": root / "good", "image": image, "mask": mask}


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step_0000002"


def _copy_run(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    return dest


def _legacy(run: Path) -> Path:
    """What an older lvd wrote: no safetensors backbone, RNG as a torch.save pickle."""
    step = _step(run)
    for name in (ckpt.BACKBONE_WEIGHTS, ckpt.BACKBONE_CONFIG, ckpt.rng_file(0)):
        (step / name).unlink()
    return step


def _hostile_run(good: Path, dest: Path, marker: Path) -> Path:
    """An old-style run folder whose `.metadata` and `rng-rank0.pt` run code when unpickled."""
    run = _copy_run(good, dest)
    step = _legacy(run)
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (step / "rng-rank0.pt").write_bytes(pickle.dumps(Payload(marker)))
    return run


def _nested_metadata(good: Path, dest: Path, marker: Path) -> Path:
    """Genuine DCP metadata with the payload hidden one level down (planner_data)."""
    run = _copy_run(good, dest)
    md = ckpt.read_dcp_metadata(_step(run) / ".metadata")
    md.planner_data = {"x": Payload(marker)}
    (_step(run) / ".metadata").write_bytes(pickle.dumps(md))
    return run


def _hostile_value(good: Path, dest: Path, marker: Path) -> Path:
    """Genuine metadata, but one optimizer setting (a DCP byte item, torch.load'ed by DCP's
    default planner without weights_only) points at a payload appended to the shard."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    run = _copy_run(good, dest)
    step = _step(run)
    md = ckpt.read_dcp_metadata(step / ".metadata")
    index = next(i for i in md.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = md.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    shard = step / info.relative_path
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(blob.getvalue())
    md.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(md))
    return run


def _model_commands(data, model: Path, out: Path) -> list[tuple[str, list[str]]]:
    img, root = str(data["image"]), data["root"]
    return [
        ("viz", ["viz", "--model", str(model), "--image", img, "--out", str(out / "v.png"), "--size", "56"]),
        (
            "embed",
            [
                "embed",
                "--model",
                str(model),
                "--images",
                str(root / "images"),
                "--out",
                str(out / "emb"),
                "--size",
                "56",
                "--no-ray",
            ],
        ),
        ("export", ["export", str(model), "--hf", str(out / "hf")]),
        (
            "segment",
            [
                "segment",
                "--model",
                str(model),
                "--reference",
                img,
                "--mask",
                str(data["mask"]),
                "--target",
                img,
                "--out",
                str(out / "s.png"),
                "--size",
                "56",
            ],
        ),
        (
            "probe",
            [
                "probe",
                "dense",
                "--model",
                str(model),
                "--train",
                str(root / "images"),
                "--val",
                str(root / "images"),
                "--size",
                "56",
            ],
        ),
        (
            "eval knn",
            [
                "eval",
                "knn",
                "--checkpoint",
                str(model),
                "--train",
                str(root / "images"),
                "--val",
                str(root / "images"),
                "--k",
                "1",
            ],
        ),
    ]


@pytest.fixture(scope="module")
def index(data):
    """A genuine search index (embedded with the genuine run) to query with hostile models."""
    root = data["root"]
    assert (
        main(
            [
                "embed",
                "--model",
                str(data["good"]),
                "--images",
                str(root / "images"),
                "--out",
                str(root / "emb"),
                "--size",
                "56",
                "--no-ray",
            ]
        )
        == 0
    )
    assert main(["index", "--embeddings", str(root / "emb"), "--out", str(root / "idx")]) == 0
    return root / "idx"


def test_model_commands_never_unpickle_a_run_folder(data, index, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    run = _hostile_run(data["good"], tmp_path / "evil", marker)
    for model in (run, _step(run)):  # a run's --out folder and a step folder
        for name, argv in _model_commands(data, model, tmp_path / "out"):
            with pytest.raises(LegacyCheckpointError, match="convert") as e:
                main(argv)
            assert ckpt.BACKBONE_WEIGHTS in str(e.value), name
            assert not marker.exists(), name
        # search: --model, and a hostile index whose meta.json names the run
        assert (
            main(["search", "--index", str(index), "--query", str(data["image"]), "--model", str(model), "-k", "1"])
            == 2
        )
        assert "convert" in capsys.readouterr().err
        evil_index = tmp_path / "evil-index"
        shutil.copytree(index, evil_index, dirs_exist_ok=True)
        meta = json.loads((evil_index / "meta.json").read_text())
        (evil_index / "meta.json").write_text(json.dumps({**meta, "model": str(model)}))
        assert main(["search", "--index", str(evil_index), "--query", str(data["image"]), "-k", "1"]) == 2
        assert "convert" in capsys.readouterr().err
        # the library entry points: load_backbone and curate's embedder
        from lvd.curation.embed import Embedder

        for load in (load_backbone, Embedder, ckpt.load_teacher_backbone):
            with pytest.raises(LegacyCheckpointError, match="convert"):
                load(model)
        assert not marker.exists()
    # the deliberate conversion reads DCP through the restricted unpickler: refused too
    assert ckpt._main(["convert", str(run)]) == 1
    assert "refusing to unpickle builtins.exec" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_refuses_hostile_pickles(data, tmp_path):
    marker = tmp_path / "PWNED"
    shards = str(data["root"] / "shards")

    def resume(run: Path) -> None:
        main(["pretrain", "--shards", shards, "--out", str(run), "--resume", "--max-steps", "3", *TRAIN])

    def refused(run: Path, pattern: str) -> None:  # one `error:` line naming the file
        with pytest.raises(SystemExit) as e:
            resume(run)
        message = str(e.value)
        assert re.match(r"lvd pretrain: error: \S*" + pattern, message) and "\n" not in message

    refused(
        _hostile_run(data["good"], tmp_path / "a", marker),
        r"step_0000002/\.metadata: refusing to unpickle builtins\.exec",
    )
    refused(
        _nested_metadata(data["good"], tmp_path / "b", marker),
        r"step_0000002/\.metadata: refusing to unpickle builtins\.exec",
    )
    run = _copy_run(data["good"], tmp_path / "c")  # genuine DCP files, hostile old RNG file
    _legacy(run)
    (_step(run) / "rng-rank0.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    refused(run, r"step_0000002/rng-rank0\.pt: refusing to unpickle")
    refused(
        _hostile_value(data["good"], tmp_path / "d", marker),
        r"step_0000002: checkpoint value 'optimizer\.param_groups\.0\.lr': refusing to unpickle",
    )
    # the library call raises the error itself
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to unpickle"):
        load_checkpoint(_step(tmp_path / "a"), {"optimizer": {}})
    assert not marker.exists()
    # and genuine checkpoints still resume, old-style ones (torch.save'd RNG) included
    run = _copy_run(data["good"], tmp_path / "e")
    _legacy(run)
    torch.save(ckpt.rng_state(), _step(run) / "rng-rank0.pt")
    resume(run)
    assert ckpt.latest_checkpoint(run).name == "step_0000003"


def test_legacy_checkpoint_converts_then_loads(data, tmp_path, capsys):
    good = load_backbone(data["good"])
    run = _copy_run(data["good"], tmp_path / "old")
    step = _legacy(run)
    torch.save(ckpt.rng_state(), step / "rng-rank0.pt")
    with pytest.raises(LegacyCheckpointError, match=f"{ckpt.CONVERT} {step}"):
        load_backbone(run)
    assert ckpt._main(["convert", str(run)]) == 0
    assert "wrote teacher_backbone.safetensors" in capsys.readouterr().out
    converted = load_backbone(run)
    for (name, a), b in zip(good.state_dict().items(), converted.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert (step / ckpt.rng_file(0)).is_file()


def test_restricted_unpickler_admits_dcp_metadata_only(data, tmp_path):
    md = ckpt.read_dcp_metadata(_step(data["good"]) / ".metadata")
    assert len(md.state_dict_metadata) > 100
    for evil in (Payload(tmp_path / "m"), {"a": [Payload(tmp_path / "m")]}):
        path = tmp_path / ".metadata"
        path.write_bytes(pickle.dumps(evil))
        with pytest.raises(UnsafeCheckpointError, match=f"{path}: refusing to unpickle"):
            ckpt.read_dcp_metadata(path)
    # a data file outside the checkpoint folder is refused too
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    key = next(iter(md.storage_data))
    md.storage_data[key] = _StorageInfo("../../etc/passwd", 0, 10)
    path.write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="outside its folder"):
        ckpt.read_dcp_metadata(path)
    assert not (tmp_path / "m").exists()


def _draws() -> list:
    return [
        random.random(),
        random.gauss(0, 1),
        float(np.random.randn()),
        np.random.randint(0, 2**31, 4).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    ]


def test_rng_round_trip_without_pickle(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian (python gauss_next)
    np.random.randn(3)  # odd count: numpy keeps a cached gaussian too
    path = tmp_path / "rng-rank0.safetensors"
    save_rng_state(path)
    expected = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_rng_state(path))
    assert _draws() == expected
    # a plain safetensors file: tensors + a JSON header, nothing to unpickle
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) >= {"torch", "numpy_keys", "python_internal"}
        assert json.loads(f.metadata()["lvd"])["format"] == "lvd-rng"
    assert path.read_bytes()[:2] != b"\x80\x04" and not path.read_bytes().startswith(b"PK")
    # a file that is not one is refused with its name
    path.write_bytes(pickle.dumps({"torch": 1}))
    with pytest.raises(ValueError, match="not an lvd RNG state file"):
        load_rng_state(path)


def _state(value: float) -> dict:
    return {
        "teacher": {"backbone.cls_token": torch.full((1, 1, 8), value)},
        "dino_loss": {"center": torch.full((4,), value)},
    }


def _saved_value(step_dir: Path) -> float:
    state = _state(0.0)
    load_checkpoint(step_dir, state, optional=())
    return float(state["dino_loss"]["center"][0])


def test_crash_while_publishing_keeps_the_old_step(tmp_path, monkeypatch):
    meta = lambda step: CheckpointMeta(
        step=step,
        data_batches=step,
        world_size=1,  # noqa: E731
        recipe=tiny().to_dict(),
    )
    save_checkpoint(tmp_path, _state(1.0), meta(2), keep=1)
    step2 = tmp_path / "checkpoints" / "step_0000002"

    def crash(tmp, final):
        raise RuntimeError("killed while publishing")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_publish", crash)
        # the same step written again (after a resume), killed between write and publish
        with pytest.raises(RuntimeError, match="killed"):
            save_checkpoint(tmp_path, _state(2.0), meta(2), keep=1)
        assert ckpt.is_complete(step2) and _saved_value(step2) == 1.0
        # the next step, killed before publishing: retention has not run, step 2 is there
        with pytest.raises(RuntimeError, match="killed"):
            save_checkpoint(tmp_path, _state(3.0), meta(3), keep=1)
        assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002"]
        assert _saved_value(step2) == 1.0
    # published for real: the same step replaced in place, then the older step pruned
    save_checkpoint(tmp_path, _state(2.0), meta(2), keep=1)
    assert _saved_value(step2) == 2.0
    monkeypatch.setattr(ckpt, "_rename_exchange", lambda a, b: False)  # no renameat2 here
    save_checkpoint(tmp_path, _state(4.0), meta(2), keep=1)
    assert _saved_value(step2) == 4.0
    save_checkpoint(tmp_path, _state(5.0), meta(3), keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp")) and not list((tmp_path / "checkpoints").glob("*.old"))
