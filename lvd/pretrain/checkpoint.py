"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: `OUT/checkpoints/step_NNNNNNN/` holds the DCP files (`.metadata` + shards: student,
teacher, optimizer, loss centres), `meta.json` (step, data position, recipe) and one
`rng-rankR.pt` per rank. Every file is written into `step_NNNNNNN.tmp/` which is renamed
only when complete, so a crash mid-save never leaves a directory that looks complete.
DCP works in one process without a process group, and with FSDP2 DTensors unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

STEP_DIR = re.compile(r"^step_(\d{7})$")
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointMeta:
    step: int  # optimizer steps done; training resumes at this step index
    data_batches: int  # batches this rank's loader has yielded (the data position)
    world_size: int
    recipe: dict[str, Any]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process call even with no_dist=True; that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and (path / ".metadata").is_file() and (
        path / META_FILE
    ).is_file()


def list_checkpoints(path: str | Path) -> list[Path]:
    """Complete checkpoints under a run's OUT folder or its `checkpoints/`, oldest first."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))


def latest_checkpoint(path: str | Path) -> Path | None:
    """A complete checkpoint dir itself, or the latest one under a run's OUT folder."""
    path = Path(path)
    if is_complete(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: str | Path, state: dict[str, Any], meta: CheckpointMeta, *, keep: int,
) -> Path:
    """Write `state` (nested dicts of tensors) + meta + this rank's RNG; keep the newest `keep`."""
    final = checkpoint_dir(out, meta.step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
    torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(out, keep=keep)
    _barrier()
    return final


def prune_checkpoints(out: str | Path, *, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def read_meta(ckpt: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(ckpt) / META_FILE).read_text()))


def _drop_unsaved(tree: dict[str, Any], saved: set[str], prefix: str) -> dict[str, Any]:
    """`tree` without the entries under `prefix` that the checkpoint does not hold."""
    out = {}
    for key, value in tree.items():
        flat = f"{prefix}.{key}"
        if flat in saved or any(k.startswith(flat + ".") for k in saved):
            out[key] = _drop_unsaved(value, saved, flat) if isinstance(value, dict) else value
    return out


def load_checkpoint(
    ckpt: str | Path, state: dict[str, Any], *, optional: tuple[str, ...] = ("optimizer",),
) -> CheckpointMeta:
    """Load in place into `state` (same structure as saved) and restore this rank's RNG.

    Under the `optional` top-level keys, entries missing from the checkpoint are dropped
    from `state` instead of failing: AdamW has no state for a parameter that never had a
    gradient (the prototypes while frozen), yet the pre-allocated optimizer state has one.
    Everything else (weights, centres) must be present.
    """
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no .metadata/{META_FILE})")
    saved = set(dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    for key in optional:
        state[key] = _drop_unsaved(state[key], saved, key)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=ckpt, no_dist=not _distributed())
    rng = ckpt / f"rng-rank{_rank()}.pt"
    if rng.exists():
        # our own file, holding numpy/python RNG tuples that weights_only cannot represent
        set_rng_state(torch.load(rng, weights_only=False))
    return read_meta(ckpt)


def resolve_checkpoint(path: str | Path) -> Path:
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"no complete checkpoint at {path}; pass a step_NNNNNNN dir or a run's --out folder"
        )
    return ckpt


def load_teacher_backbone(path: str | Path) -> torch.nn.Module:
    """The teacher's `VisionTransformer` (eval mode, CPU) from a checkpoint or run folder."""
    from lvd.pretrain.recipes import Recipe

    ckpt = resolve_checkpoint(path)
    recipe = Recipe.from_dict(read_meta(ckpt).recipe)
    backbone = recipe.backbone.build(img_size=recipe.crops.global_size)
    sd = backbone.state_dict()
    # DCP loads only the keys asked for: the teacher backbone, not student or optimizer.
    with _quiet_single_process():
        dcp.load({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, checkpoint_id=ckpt,
                 no_dist=not _distributed())
    backbone.load_state_dict(sd)
    return backbone.eval()
