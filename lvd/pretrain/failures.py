"""Fail-fast checks and messages of the training loop: each says what went wrong and what to change.

- shards that are empty or not tar files, found before any model is built (missing and
  unreadable paths are refused earlier, by `data.expand_shards`);
- a resume on another number of ranks that its checkpoint's data plan cannot be mapped to;
- a CUDA out-of-memory in a step, re-raised naming the settings that lower memory.
"""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.recipes import Recipe

TAR_BLOCK = 512
MAX_NAMED = 10
# The exit code of a rank, and of `lvd pretrain`, that stopped on a failure a relaunch from the
# same checkpoint would meet again (the flow relaunches on any other non-zero code).
EXIT_REPEATS = 3


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from cannot continue under the current settings."""


class ShardFilesError(ValueError):
    """Shards that hold no samples (empty, not a tar)."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step and every term."""


class RepeatingFailure(RuntimeError):
    """A rank of a multi-rank launch stopped with `EXIT_REPEATS`; the message is its error."""


class RepeatsExit(SystemExit):
    """`lvd pretrain` stopping on a failure a relaunch would repeat: `str()` is the message
    (printed on stderr by `stop`), the process exit code is EXIT_REPEATS."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = EXIT_REPEATS


def stop(message: str) -> NoReturn:
    """One `message` line on stderr, then exit with EXIT_REPEATS."""
    print(message, file=sys.stderr, flush=True)
    raise RepeatsExit(message)


def repeats(error: BaseException) -> bool:
    """Would a relaunch from the latest checkpoint meet `error` again? Settings, inputs and
    numerics: yes; a lost rank, a node or a network: no."""
    from lvd.pretrain.data.shard_stream import MissingShardsError

    return isinstance(
        error,
        (
            ResumeMismatchError,
            ShardFilesError,
            MissingShardsError,
            NonFiniteLossError,
            torch.OutOfMemoryError,
            RepeatingFailure,
        ),
    )


def _first_block_problem(path: str) -> str | None:
    """Why this shard holds no samples, from its first 512-byte tar header; None if it may."""
    try:
        with open(path, "rb") as f:
            block = f.read(TAR_BLOCK)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if len(block) == 0:
        return "empty file"
    if len(block) < TAR_BLOCK or block.count(0) == TAR_BLOCK:
        return "no samples (empty tar)"  # a tar with no members is all zero blocks
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return "not a tar file"
    return None


def check_shard_files(shards: Sequence[str]) -> None:
    """Raise naming every shard that is empty, unreadable or not a tar (one read each)."""
    bad = [(p, why) for p in shards if (why := _first_block_problem(p)) is not None]
    if bad:
        more = f" (and {len(bad) - MAX_NAMED} more)" if len(bad) > MAX_NAMED else ""
        named = ", ".join(f"{p} ({why})" for p, why in bad[:MAX_NAMED])
        raise ShardFilesError(
            f"unusable shards: {named}{more}; rewrite them (lvd curate) or leave them out of --shards"
        )


def check_world_size(checkpoint: object, saved: ckpt.CheckpointMeta, current: int) -> None:
    """A checkpoint resumes on another number of ranks when its data plan can be remapped
    (data/plan.py): at most as many ranks as the run has data streams. A checkpoint of an
    lvd before elastic resume has no per-stream positions and resumes only on its own ranks."""
    if saved.world_size == current:
        return
    if saved.data is None:
        raise ResumeMismatchError(
            f"{checkpoint} was written by {saved.world_size} rank(s) but this run has {current}, "
            "and it holds no data-stream positions (an older lvd wrote it), so the data position "
            "cannot be mapped to another number of ranks; relaunch with the same ranks in all "
            f"(--nproc-per-node x --nnodes, or --ray-workers, = {saved.world_size}) to resume, "
            "or start a new run (another --out folder, or without --resume)"
        )
    streams = int(saved.data["plan"]["streams"])
    if current > streams:
        raise ResumeMismatchError(
            f"{checkpoint} was written by {saved.world_size} rank(s) of a run whose data is "
            f"{streams} streams; {current} ranks cannot share them (each rank reads whole "
            f"streams). Resume on at most {streams} ranks in all (--nproc-per-node x --nnodes, "
            "or --ray-workers), or start a new run (another --out folder, or without --resume)"
        )


def check_recipe(checkpoint: object, saved: Recipe, current: Recipe) -> None:
    if saved != current:
        raise ResumeMismatchError(
            f"{checkpoint} was trained with recipe {saved.name!r} and other settings; resume "
            "with the same --recipe, --config, --set and --batch-size (or pass the run's own "
            "settings back: --config OUT/config.json)"
        )


def checked_resume_point(out: Path, resume: bool, recipe: Recipe, world_size: int) -> Path | None:
    """The checkpoint a run resumes from, checked against its recipe and world size; None
    for a fresh run (no --resume, or no complete checkpoint yet)."""
    last = ckpt.latest_checkpoint(out) if resume else None
    if last is not None:
        saved = ckpt.read_meta(last)
        check_world_size(last, saved, world_size)
        check_recipe(last, Recipe.from_dict(saved.recipe), recipe)
    return last


def oom_message(recipe: Recipe, *, world_size: int, step: int, bf16: bool, device: torch.device | None = None) -> str:
    """What to lower after CUDA ran out of memory at `step`, with this run's values."""
    c = recipe.crops
    memory = ""
    if device is not None and device.type == "cuda":
        gib = 2**30
        memory = (
            f" ({torch.cuda.memory_allocated(device) / gib:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_allocated(device) / gib:.1f} GiB peak)"
        )
    precision = "bf16 autocast is already on" if bf16 else "train in bf16 (train on a GPU: bf16 autocast is used there)"
    return (
        f"CUDA out of memory at step {step}{memory}. Lower, in this order: "
        f"--batch-size (now {recipe.batch_size} images per rank); the number or size of the "
        f"local crops (now --set crops.n_local={c.n_local} --set crops.local_size={c.local_size}"
        f"; e.g. --set crops.n_local={max(0, c.n_local // 2)}); "
        f"the model (--recipe {recipe.name} -> a smaller one, e.g. tiny or vits14); or spread "
        f"it over more ranks (now {world_size}: FSDP2 shards weights, gradients and AdamW "
        f"state over --nproc-per-node x --nnodes); {precision}"
    )
