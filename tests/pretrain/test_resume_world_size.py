"""A checkpoint written by 2 ranks is refused by a 1-process resume, before any model is
built, with a message naming both world sizes and what to do."""

from pathlib import Path

import pytest

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.failures import ResumeMismatchError
from lvd.pretrain.train import TrainConfig, train

# the 2-rank helpers of the FSDP tests: real torchrun with gloo, and their tiny shards
from pretrain.test_fsdp import SCRIPTS, shards, torchrun  # noqa: F401 -- `shards` is a fixture


def _test_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_train", SCRIPTS / "run_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.test_recipe()


def test_one_process_resume_of_a_two_rank_checkpoint_is_refused(shards, tmp_path: Path):  # noqa: F811
    out = tmp_path / "run"
    torchrun(2, "run_train.py", out, 1, 0, *shards)
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == "step_0000001"
    assert ckpt.read_meta(last).world_size == 2

    cfg = TrainConfig(shards=tuple(shards), recipe=_test_recipe(), out=out, max_steps=2,
                      resume=True, num_workers=0, seed=0, deterministic=True, pictures=False)
    with pytest.raises(ResumeMismatchError) as err:
        train(cfg)
    message = str(err.value)
    assert str(last) in message
    assert "written by 2 rank(s) but this run has 1" in message
    assert "--nproc-per-node x --nnodes, or --ray-workers, = 2" in message and "start a new run" in message
    # refused before training: train() writes its pid file only once it is ready to train
    assert not (out / "ranks" / "rank0.pid").exists()
    # nothing was trained or overwritten: the checkpoint is still the only one
    assert ckpt.list_checkpoints(out) == [last]
    assert not (out / "checkpoints" / "step_0000002").exists()
