"""DINOv2's high-resolution adaptation: a short last phase at 518 px that continues a run.

DINOv2 (Oquab et al. 2023, section 4 "Adapting the resolution", appendix B.2) ends pretraining
with 10k iterations at 518 x 518 px: the model starts from the pretrained weights and trains
"with the same procedure as the original pretraining", every schedule "kept the same ... but
compressed to fit in 10k iterations", every hyperparameter kept "except the base learning rate
which is reduced". The official repository has no config or code for this phase (its issue
#211), nor the reduced value: lvd uses a tenth (`LR_SCALE`; `--set optim.base_lr=` changes it).

The phase is a recipe: the run's own, with `highres_settings` on top (global crops 37 patches a
side, 518 px at patch 14 as in the released models; `epoch_length` such that the run's epochs
fit in 10k iterations, so warmups and cosines keep their shapes; base lr x `LR_SCALE`; and
`phase.from_run`). `lvd pretrain --highres-from RUN` builds it; `--set` still changes any field.

A run whose recipe has `phase.from_run` starts (when it is not resuming its own checkpoint)
from that run's last checkpoint: `phase_start` reads the student, the teacher (backbones and
heads) and the loss centres from its DCP files (through checkpoint.py's restricted reader; any
world size wrote them) and resizes each `pos_embed` with the ViT's own `interpolate_pos_embed`
(bicubic with the official 0.1 offset). AdamW state, the schedules and the data start over.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.recipes import Recipe

GRID = 37  # patches a side: 518 px at patch 14, the grid of the released DINOv2 models
ITERS = 10_000
LR_SCALE = 0.1
PARTS = ("student", "teacher", "dino_loss", "ibot_loss")


class PhaseMismatchError(ValueError):
    """The phase's recipe cannot start from the run's weights (another architecture)."""


def run_checkpoint(run: str | Path) -> Path:
    return ckpt.resolve_checkpoint(run)


def run_recipe(run: str | Path) -> Recipe:
    """The recipe the run's last checkpoint was trained with."""
    return Recipe.from_dict(ckpt.read_meta(run_checkpoint(run)).recipe)


def highres_settings(recipe: Recipe, run: str | Path, *, iters: int = ITERS) -> dict[str, Any]:
    """The high-resolution phase as dotted recipe settings over the run's `recipe`."""
    return {
        "name": f"{recipe.name}_highres",
        "phase.from_run": str(Path(run).expanduser().resolve()),
        "crops.global_size": GRID * recipe.backbone.patch_size,
        "epoch_length": max(1, round(iters / recipe.epochs)),  # the run's epochs, compressed
        "optim.base_lr": recipe.optim.base_lr * LR_SCALE,
    }


def highres_overrides(
    run: str | Path, config: str | Path | None = None, sets: list[str] = ()
) -> tuple[Path, list[str]]:
    """`--config` and `--set` arguments that give the phase: the run's config.json (its full
    recipe), the settings above, then the user's `sets`, for `overrides.resolve_recipe`."""
    if config is not None:
        raise ValueError(
            f"--highres-from {run} takes the run's own config.json; change single "
            f"settings with --set instead of --config {config}"
        )
    last = run_checkpoint(run)
    config = last.parent.parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} is missing: --highres-from needs the run's config.json "
            "(train writes it into the run's --out folder)"
        )
    phase = [f"{k}={v}" for k, v in highres_settings(run_recipe(run), run).items()]
    return config, [*phase, *sets]


# ---------------------------------------------------------------- the phase's start weights


@dataclass(frozen=True)
class PhaseReport:
    """What the phase loaded, written as OUT/phase.json."""

    from_checkpoint: str
    loaded: int = 0
    resized: dict[str, list[list[int]]] = field(default_factory=dict)  # key -> [from, to]

    def summary(self) -> str:
        resized = "".join(f"; {k} interpolated {a} -> {b}" for k, (a, b) in self.resized.items())
        return f"{self.loaded} tensors from {self.from_checkpoint}{resized}"

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class PhaseStart:
    tensors: dict[str, dict[str, torch.Tensor]]  # part ("student", ...) -> its state dict entries
    report: PhaseReport


def _same_model(run: Recipe, phase: Recipe) -> list[str]:
    """Recipe fields that change the model's tensors, where the run and the phase differ."""
    fields = ("backbone", "dino_head", "ibot_head")
    differ = [f for f in fields if getattr(run, f) != getattr(phase, f)]
    if run.loss.separate_ibot_head != phase.loss.separate_ibot_head:
        differ.append("loss.separate_ibot_head")
    return differ


def _interpolated(pos_1TD: torch.Tensor, run: Recipe, grid: int) -> torch.Tensor:
    """`pos_1TD` (the run's grid) on a grid x grid patch grid, by the ViT's own interpolation."""
    with torch.device("meta"):
        vit = run.backbone.build(img_size=run.crops.global_size)
    vit.pos_embed = torch.nn.Parameter(pos_1TD, requires_grad=False)  # real values, meta rest
    with torch.no_grad():
        return vit.interpolate_pos_embed(grid, grid).detach().clone()


def check_phase(recipe: Recipe) -> tuple[Path, Recipe]:
    """The run's last checkpoint and recipe, refused when its model is not the phase's."""
    last = run_checkpoint(recipe.phase.from_run)
    run = Recipe.from_dict(ckpt.read_meta(last).recipe)
    if differ := _same_model(run, recipe):
        raise PhaseMismatchError(
            f"{last} was trained with other {', '.join(differ)} than this recipe; a phase "
            "continues the run's model and changes only crops and schedules (drop the --set of "
            f"{differ[0]}, or start from its backbone with --init {recipe.phase.from_run})"
        )
    return last, run


def phase_start(recipe: Recipe) -> PhaseStart:
    """Student, teacher and loss-centre tensors for `recipe` from `recipe.phase.from_run`."""
    from lvd.pretrain.meta_arch import MetaArch

    last, run = check_phase(recipe)
    with torch.device("meta"):
        source = MetaArch(run)
    state = {
        part: {k: torch.empty(v.shape, dtype=v.dtype) for k, v in getattr(source, part).state_dict().items()}
        for part in PARTS
    }
    ckpt.load_state(last, state)
    grid = recipe.crops.global_size // recipe.backbone.patch_size
    resized = {}
    for part in ("student", "teacher"):
        pos = state[part]["backbone.pos_embed"]
        new = _interpolated(pos, run, grid)
        if new.shape != pos.shape:
            resized[f"{part}.backbone.pos_embed"] = [list(pos.shape), list(new.shape)]
        state[part]["backbone.pos_embed"] = new
    report = PhaseReport(from_checkpoint=str(last), loaded=sum(map(len, state.values())), resized=resized)
    return PhaseStart(state, report)


def apply_phase_start(meta, start: PhaseStart) -> None:
    """Copy the phase's start into a freshly built `MetaArch` (rank 0's real model under FSDP2;
    `copy_in` leaves a meta-device build alone, the other ranks receive rank 0's values)."""
    meta.copy_in("student", start.tensors["student"])
    meta.copy_in("teacher", start.tensors["teacher"])
    for part in ("dino_loss", "ibot_loss"):
        module = getattr(meta, part)
        if not any(t.is_meta for t in module.state_dict().values()):
            module.load_state_dict(start.tensors[part])


def start_of_run(recipe: Recipe, *, init: str | None, rank: int, resuming: bool, out: Path) -> PhaseStart | None:
    """The phase start a fresh run of `recipe` needs (read on rank 0 only: the others build
    on the meta device and receive rank 0's weights), reported in OUT/phase.json."""
    if not recipe.phase.from_run or resuming:
        return None
    if init:
        raise ValueError(
            f"--init {init} and phase.from_run={recipe.phase.from_run} both give the start weights; keep one"
        )
    check_phase(recipe)  # every rank refuses, so none waits in a collective for rank 0
    if rank != 0:
        return None
    start = phase_start(recipe)
    out.mkdir(parents=True, exist_ok=True)
    start.report.write(out / "phase.json")
    print(f"lvd pretrain: phase {recipe.name}: {start.report.summary()}", flush=True)
    return start
