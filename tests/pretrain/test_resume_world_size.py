"""What elastic resume cannot map is refused before any model is built, naming the fix: a
checkpoint of an lvd before elastic resume (no data-stream positions) on another world size,
and more ranks than the run has data streams. (What it can map: test_elastic_resume.py.)"""

import json
from pathlib import Path

import pytest

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.failures import ResumeMismatchError, check_world_size
from lvd.pretrain.train import TrainConfig, train

# the 2-rank helpers of the FSDP tests: real torchrun with gloo, and their tiny shards
from pretrain.test_fsdp import SCRIPTS, shards, torchrun  # noqa: F401 -- `shards` is a fixture


def _test_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_train", SCRIPTS / "run_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.test_recipe()


def test_unmappable_resumes_are_refused_before_building(shards, tmp_path: Path):  # noqa: F811
    out = tmp_path / "run"
    torchrun(2, "run_train.py", out, 1, 0, *shards)
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == "step_0000001"
    saved = ckpt.read_meta(last)
    assert saved.world_size == 2 and saved.data["plan"]["streams"] == 4  # 4 shards

    # more ranks than streams: each rank reads whole streams
    for ranks in (1, 3, 4):
        check_world_size(last, saved, ranks)
    with pytest.raises(
        ResumeMismatchError,
        match=r"data is 4 streams; 5 ranks cannot share them"
        r".*at most 4 ranks in all",
    ):
        check_world_size(last, saved, 5)

    # an older lvd's checkpoint: meta.json without the data plan, resumed on 1 process
    meta = json.loads((last / ckpt.META_FILE).read_text())
    del meta["data"]
    (last / ckpt.META_FILE).write_text(json.dumps(meta))
    cfg = TrainConfig(
        shards=tuple(shards),
        recipe=_test_recipe(),
        out=out,
        max_steps=2,
        resume=True,
        num_workers=0,
        seed=0,
        deterministic=True,
        pictures=False,
    )
    with pytest.raises(ResumeMismatchError) as err:
        train(cfg)
    message = str(err.value)
    assert str(last) in message
    assert "written by 2 rank(s) but this run has 1" in message and "no data-stream positions" in message
    assert "--nproc-per-node x --nnodes, or --ray-workers, = 2" in message and "start a new run" in message
    # refused before training: train() writes its pid file only once it is ready to train
    assert not (out / "ranks" / "rank0.pid").exists()
    # nothing was trained or overwritten: the checkpoint is still the only one
    assert ckpt.list_checkpoints(out) == [last]
    assert not (out / "checkpoints" / "step_0000002").exists()
