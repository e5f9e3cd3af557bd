"""Elastic resume: a checkpoint written on N ranks continues on N' ranks.

- the data plan's stream positions against a step-by-step simulation of who reads what;
- sample accounting with real loaders and shards: what each rank read before a 2 -> 1 or
  1 -> 2 resume and after it is exactly each stream's next samples (none repeated, none
  skipped; the issue's bound is one global batch);
- real torchrun + gloo: DCP reshards student, teacher, centres and AdamW state on load (the
  state restored on 1 and on 2 ranks is the same, and the teacher equals the backbone
  gathered when the checkpoint was written), each rank's RNG is restored or freshly seeded,
  and the loss curve goes on from where it was, not from the initial loss.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.data import MaskingConfig, MultiCropConfig, make_dataloader
from lvd.pretrain.data.plan import DataPlan, fresh_plan
from lvd.pretrain.data.shard_stream import SlotSpec, raw_stream

# the 2-rank helpers of the FSDP tests: real torchrun with gloo, and their tiny shards
from pretrain.test_fsdp import shards, torchrun  # noqa: F401 -- `shards` is a fixture

B = 4  # images per rank per step (the test recipe's batch size)
LOADER = dict(
    batch_size=B,
    seed=0,
    shuffle_buffer=8,
    shuffle_shards=2,
    crops=MultiCropConfig(global_size=28, local_size=14, n_local=1),
    masking=MaskingConfig(patch_size=14),
)


# ---------------------------------------------------------------- the plan's arithmetic


def _simulate(plan: DataPlan, steps: int) -> list[int]:
    """Stream positions after `steps` steps, by playing every batch of every rank."""
    pos, turn = list(plan.positions), {}
    for i in range(plan.step, plan.step + steps):
        for rank in range(plan.world_size):
            logical = (i - plan.step) % plan.n_workers(rank)
            streams = plan.worker_streams(rank, logical)
            for _ in range(plan.batch_size):
                t = turn.get((rank, logical), 0)
                pos[streams[t % len(streams)]] += 1
                turn[(rank, logical)] = t + 1
    return pos


@pytest.mark.parametrize(
    "streams, world, workers, batch",
    [(8, 1, 1, 3), (8, 2, 3, 5), (8, 3, 2, 4), (5, 2, 4, 2), (4, 4, 1, 1), (64, 6, 8, 7)],
)
def test_positions_equal_a_batch_by_batch_simulation(streams, world, workers, batch):
    plan = DataPlan(
        streams=streams, step=3, positions=tuple(range(streams)), world_size=world, workers=workers, batch_size=batch
    )
    for steps in (0, 1, 2, 7, 13):
        assert list(plan.positions_at(3 + steps)) == _simulate(plan, steps), steps
        assert sum(plan.positions_at(3 + steps)) - sum(plan.positions) == steps * world * batch
    # every stream belongs to exactly one rank, and within it to exactly one worker
    owned = [v for r in range(world) for w in range(plan.n_workers(r)) for v in plan.worker_streams(r, w)]
    assert sorted(owned) == list(range(streams))


def test_same_layout_keeps_the_segment_another_starts_a_new_one():
    plan = fresh_plan(n_shards=4, world_size=2, workers=0, batch_size=B)
    assert plan.streams == 4  # min(shards, 8) > 2 ranks x 1 worker
    assert plan.resumed(6, world_size=2, workers=1, batch_size=B) is plan  # 0 workers = 1 slot
    one = plan.resumed(6, world_size=1, workers=0, batch_size=B)
    assert (one.step, one.positions, one.world_size) == (6, plan.positions_at(6), 1)
    assert one.positions == (12, 12, 12, 12)  # 6 steps x 2 ranks x 4 images over 4 streams
    with pytest.raises(ValueError, match="4 streams.*5 ranks cannot share them"):
        plan.resumed(6, world_size=5, workers=0, batch_size=B)
    assert DataPlan.from_dict(json.loads(json.dumps(one.to_dict()))) == one


# ---------------------------------------------------------------- sample accounting, real shards


def _read(
    shards: list[str], plan: DataPlan | None, *, world: int, start: int, steps: int, workers: int = 0
) -> tuple[list[str], DataPlan]:
    """uids every rank's loader yields for steps [start, start + steps), and the plan used."""
    seen = []
    for rank in range(world):
        loader = make_dataloader(
            shards, rank=rank, world_size=world, num_workers=workers, start_batch=start, plan=plan, **LOADER
        )
        seen += [u for b in itertools.islice(iter(loader), steps) for u in b.uids]
    used = plan or fresh_plan(n_shards=len(shards), world_size=world, workers=workers, batch_size=B)
    return seen, used.resumed(start, world_size=world, workers=workers, batch_size=B)


def _stream_uids(shards: list[str], plan: DataPlan, v: int, begin: int, end: int) -> list[str]:
    spec = SlotSpec(seed=0, slot=v, n_slots=plan.streams, buffer=8, group=2)
    raws = itertools.islice(raw_stream(shards, spec, skip=begin), end - begin)
    return [json.loads(r.files["json"])["uid"] for r in raws]


def _between(shards, plan, begin: tuple[int, ...], end: tuple[int, ...]) -> Counter:
    """The samples each stream holds between two position vectors."""
    return Counter(u for v in range(plan.streams) for u in _stream_uids(shards, plan, v, begin[v], end[v]))


@pytest.mark.parametrize(
    "before, after", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((1, 0), (1, 2))], ids=["2to1", "1to2", "1to1-more-workers"]
)
def test_resume_on_another_layout_repeats_and_skips_no_sample(shards, before, after):  # noqa: F811
    k, n = 3, 3
    (w0, j0), (w1, j1) = before, after
    seen_before, plan = _read(shards, None, world=w0, start=0, steps=k, workers=j0)
    at_k = plan.positions_at(k)
    seen_after, resumed = _read(shards, plan, world=w1, start=k, steps=n, workers=j1)
    end = resumed.positions_at(k + n)
    assert resumed.step == k and resumed.positions == at_k
    # what was read is exactly the streams' samples up to the checkpoint, then the next ones
    assert Counter(seen_before) == _between(shards, plan, plan.positions, at_k)
    assert Counter(seen_after) == _between(shards, plan, at_k, end)
    read = Counter(seen_before) + Counter(seen_after)
    repeated = sum(c - 1 for c in read.values() if c > 1)
    skipped = (_between(shards, plan, plan.positions, end) - read).total()  # passed over, unread
    # the bound: no sample repeated or skipped by more than one global batch; here none at all
    global_batch = w1 * B
    assert repeated <= global_batch and skipped <= global_batch
    assert repeated == skipped == 0  # 64 distinct images, 24-36 of them read
    assert sum(read.values()) == (k * w0 + n * w1) * B


# ---------------------------------------------------------------- real ranks: torchrun + gloo

STEPS, MORE = 2, 2


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["2to1", "1to2"])
def run(request, shards, tmp_path_factory):  # noqa: F811
    """A run of STEPS steps on one world size, checkpointed and restored there, then
    restored on the other and trained MORE steps (_dist_scripts/run_elastic.py)."""
    first, second = request.param
    out = tmp_path_factory.mktemp(f"elastic{first}to{second}")
    torchrun(first, "run_elastic.py", out, STEPS, 0, *shards)
    torchrun(second, "run_elastic.py", out, STEPS + MORE, 1, *shards)
    return out, first, second


def test_restored_state_equals_the_saved_one_on_another_world_size(run):
    out, first, second = run
    saved = torch.load(out / f"restored-w{first}.pt", weights_only=True)  # restored where written
    elastic = torch.load(out / f"restored-w{second}.pt", weights_only=True)
    assert set(saved) == set(elastic)
    assert sum(k.startswith("optimizer.") for k in saved) > 50  # AdamW moments of every weight
    for key, value in saved.items():
        torch.testing.assert_close(elastic[key], value, rtol=0, atol=0, msg=key)
    # the teacher equals the backbone gathered from the live ranks when the step was written
    # (safetensors, no DCP involved), key by key, bit for bit
    written = load_file(str(out / "checkpoints" / f"step_{STEPS:07d}" / ckpt.BACKBONE_WEIGHTS))
    for key, value in written.items():
        torch.testing.assert_close(elastic[f"teacher.backbone.{key}"], value, rtol=0, atol=0, msg=key)


def test_loss_continues_from_the_checkpoint_not_from_the_start(run):
    out, first, second = run
    probe_saved = json.loads((out / f"probe-w{first}.json").read_text())
    probe_elastic = json.loads((out / f"probe-w{second}.json").read_text())
    for term in ("dino_loss", "ibot_loss"):
        # the same global batch through the restored model: equal on 1 and 2 ranks up to
        # float summation order (measured differences <= 1e-6)
        at_save, at_resume = probe_saved["restored"][term], probe_elastic["restored"][term]
        initial = probe_elastic["fresh"][term]
        assert abs(at_resume - at_save) < 1e-5, (term, at_save, at_resume)
        assert abs(at_resume - initial) > 100 * abs(at_resume - at_save), (term, initial, at_resume)
    # training went on: MORE finite steps, the step count and data plan carried over
    after = json.loads((out / f"losses-rank0-from{STEPS}.json").read_text())
    assert len(after) == MORE and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in after)
    saved = ckpt.read_meta(out / "checkpoints" / f"step_{STEPS:07d}")
    end = ckpt.read_meta(out / "checkpoints" / f"step_{STEPS + MORE:07d}")
    assert (saved.world_size, end.world_size) == (first, second)
    plan = DataPlan.from_dict(end.data["plan"])
    assert (plan.step, plan.world_size, list(plan.positions)) == (STEPS, second, saved.data["positions"])
    assert sum(end.data["positions"]) - sum(saved.data["positions"]) == MORE * second * B


def test_each_rank_restores_its_rng_or_gets_a_fresh_seeded_one(run):
    before = ckpt.rng_state()  # this test sets the process's generators; put them back after
    try:
        _check_rank_rngs(*run)
    finally:
        ckpt.set_rng_state(before)


def _check_rank_rngs(out: Path, first: int, second: int) -> None:
    step_dir = out / "checkpoints" / f"step_{STEPS:07d}"
    for rank in range(second):
        draws = json.loads((out / f"rng-w{second}-rank{rank}.json").read_text())["draws"]
        if rank < first:  # this rank's saved generator goes on where it stopped
            ckpt.set_rng_state(ckpt.load_rank_rng(step_dir, rank))
            assert torch.rand(4).tolist() == draws
        else:  # no file: seeded from (seed + rank, step), not a replay of its step-0 draws
            assert not (step_dir / ckpt.rng_file(rank)).exists()
            torch.manual_seed(0 + rank)
            assert torch.rand(4).tolist() != draws
            torch.manual_seed(0 + rank)
            ckpt.restore_rank_rng(None, step=STEPS)
            assert torch.rand(4).tolist() == draws
