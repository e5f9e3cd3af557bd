"""The training loop on the `tiny` recipe: loss goes down, exact resume, NaN detection,
atomic checkpoints with retention, metrics, and the teacher-backbone loader."""

import json
from dataclasses import replace

import pytest
import torch

from lvd.datasets import load_fashion_mnist, write_shards
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.meta_arch import LossTerms, StepOutput
from lvd.pretrain.recipes import Recipe, tiny
from lvd.pretrain.train import NonFiniteLossError, TrainConfig, check_finite, train

METRIC_KEYS = {
    "step",
    "loss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "entropy",
    "proto_usage",
    "images_per_s",
    "corrupt_samples",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images, _ = load_fashion_mnist("test")
    out = tmp_path_factory.mktemp("shards")
    return tuple(str(p) for p in write_shards(images[:96], out, samples_per_shard=32, size=56))


def _recipe(**kw) -> Recipe:
    r = tiny()
    # a short schedule: 1-step warmup, prototypes frozen for the first 2 steps
    return replace(r, batch_size=8, epochs=4, epoch_length=5, log_every=1, checkpoint_every=2, keep_checkpoints=2, **kw)


def _cfg(shards, out, **kw) -> TrainConfig:
    return TrainConfig(
        shards=shards, recipe=kw.pop("recipe", _recipe()), out=out, num_workers=1, seed=0, deterministic=True, **kw
    )


def test_loss_goes_down(shards, tmp_path):
    # `tiny` centres with Sinkhorn-Knopp; the teacher temperature is held constant here,
    # since its warmup raises the targets' entropy (and so the loss) by design.
    r = _recipe()
    r = replace(r, teacher=replace(r.teacher, temp_warmup_epochs=0))
    assert r.loss.centering == "sinkhorn_knopp"
    result = train(_cfg(shards, tmp_path / "run", recipe=r, max_steps=12, pictures=False))
    assert len(result.losses) == 12
    for term in ("loss", "dino_loss", "ibot_loss"):
        values = [x[term] for x in result.losses]
        assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, (term, values)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(12))
    assert set(lines[0]) >= METRIC_KEYS
    assert lines[0]["lr"] == 0.0 and lines[5]["lr"] > 0  # warmup starts from 0
    assert 0 < lines[-1]["proto_usage"] <= 1 and lines[-1]["entropy"] > 0


def test_resume_gives_identical_losses(shards, tmp_path):
    straight = train(_cfg(shards, tmp_path / "a", max_steps=6, pictures=False))
    first = train(_cfg(shards, tmp_path / "b", max_steps=3, pictures=False))
    second = train(_cfg(shards, tmp_path / "b", max_steps=6, resume=True))
    assert (first.end_step, second.start_step, second.end_step) == (3, 3, 6)
    assert first.losses + second.losses == straight.losses  # bit-exact, every term

    # retention: checkpoints every 2 steps plus the last, keep the newest 2
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "a")]
    assert names == ["step_0000004", "step_0000006"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    assert Recipe.from_dict(json.loads((tmp_path / "b" / "config.json").read_text())) == _recipe()
    assert (tmp_path / "b" / "pictures" / "step_0000006.png").is_file()

    # the teacher backbone loads from a run folder (latest) and equals run a's teacher
    a, b = ckpt.load_teacher_backbone(tmp_path / "a"), ckpt.load_teacher_backbone(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    older = ckpt.load_teacher_backbone(tmp_path / "a" / "checkpoints" / "step_0000004")
    assert not torch.equal(older.cls_token, a.cls_token) or not torch.equal(
        older.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight
    )


def test_half_written_checkpoint_is_ignored(shards, tmp_path):
    train(_cfg(shards, tmp_path, max_steps=2, pictures=False))
    good = ckpt.latest_checkpoint(tmp_path)
    # what a crash mid-save leaves: a temp dir with some files, and a dir without meta.json
    crashed = tmp_path / "checkpoints" / "step_0000009.tmp"
    crashed.mkdir()
    (crashed / ".metadata").write_bytes(b"partial")
    partial = tmp_path / "checkpoints" / "step_0000008"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"partial")
    assert good.name == "step_0000002" and ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")


def test_nan_loss_raises_naming_step_and_terms(shards, tmp_path):
    # An absurd learning rate without warmup blows the weights up after the first step.
    r = _recipe()
    r = replace(r, optim=replace(r.optim, base_lr=1e30, warmup_epochs=0))
    with pytest.raises(NonFiniteLossError, match=r"at step [1-5]: loss=(nan|inf).*dino_loss="):
        train(_cfg(shards, tmp_path, recipe=r, max_steps=6, pictures=False))


def test_check_finite_message():
    z = torch.tensor(0.5)
    out = StepOutput(
        LossTerms(total=torch.tensor(float("nan")), dino=z, ibot=z, koleo=torch.tensor(float("inf"))),
        entropy=1.0,
        proto_usage=0.1,
    )
    with pytest.raises(NonFiniteLossError, match="step 17: loss=nan, dino_loss=0.5, ibot_loss=0.5, koleo_loss=inf"):
        check_finite(out, 17)
    check_finite(StepOutput(LossTerms(total=z, dino=z, ibot=z, koleo=z), 1.0, 0.1), 0)
