"""`--init SPEC`: start a run's student and teacher from weights it did not write.

SPEC is anything `load_backbone` reads: an official DINOv2 `.pth` (hub or training
checkpoint), a Hugging Face Dinov2 folder, or an lvd run / checkpoint. The backbone tensors
are matched to the recipe's backbone by name:
- same name and shape: copied bit for bit into student and teacher;
- `pos_embed` on another grid (hub files are 518 px = 37x37 patches; recipes train at 224):
  resized by the source model's own `interpolate_pos_embed`, reported as resized;
- in the recipe, not in SPEC (e.g. registers a file has none of): left at their random init,
  reported as fresh;
- a shape mismatch, or a SPEC tensor the recipe has no place for: refused, naming every
  tensor with both shapes and the `--set` that picks SPEC's architecture.
Heads come from an lvd run when it saved them with fitting shapes (read from its DCP files
through `checkpoint`'s restricted reader); otherwise they start fresh, as do the loss centres.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.models.vit import ARCHITECTURES, VisionTransformer
from lvd.pretrain.recipes import Recipe

HEADS = ("dino_head", "ibot_head")


class InitMismatchError(ValueError):
    """SPEC's tensors do not fit the recipe's model (shapes or architecture)."""


@dataclass(frozen=True)
class InitReport:
    """What a start from SPEC loaded; written as OUT/init.json (or distill.json)."""

    spec: str
    loaded: list[str] = field(default_factory=list)  # keys of the ModuleDict state dict
    resized: dict[str, list[list[int]]] = field(default_factory=dict)  # key -> [from, to]
    fresh: list[str] = field(default_factory=list)  # left at the random init
    heads: str = "fresh"  # "from SPEC" or "fresh" (and why)

    def summary(self) -> str:
        resized = "".join(f"; {k} resized {a} -> {b}" for k, (a, b) in self.resized.items())
        return (
            f"{len(self.loaded)} tensors loaded from {self.spec}{resized}; "
            f"{len(self.fresh)} started fresh ({_short(self.fresh)}); heads {self.heads}"
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class StartWeights:
    """Tensors for a `MetaArch` part (keys of its state dict) and the report of where from."""

    tensors: dict[str, torch.Tensor]
    report: InitReport


def _short(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def arch_hint(source: VisionTransformer) -> str:
    """The `--set` flags that give the recipe SPEC's backbone architecture."""
    cfg = source.config
    with torch.device("meta"):
        match = [
            name
            for name, build in ARCHITECTURES.items()
            if (m := build()).embed_dim == cfg.embed_dim and len(m.blocks) == cfg.depth and m.config.ffn == cfg.ffn
        ]
    arch = (
        f"--set backbone.arch={match[0]}"
        if match
        else "no lvd architecture has that shape (see lvd/pretrain/models/vit.py)"
    )
    return (
        f"SPEC is a {cfg.embed_dim}-wide, {cfg.depth}-deep {cfg.ffn} ViT with patch "
        f"{cfg.patch_size} and {cfg.num_register_tokens} registers: {arch} "
        f"--set backbone.patch_size={cfg.patch_size} "
        f"--set backbone.num_register_tokens={cfg.num_register_tokens}"
    )


def _grid(shape: tuple[int, ...]) -> int | None:
    side = int(round((shape[1] - 1) ** 0.5))
    return side if side * side == shape[1] - 1 else None


def match_backbone(
    source: VisionTransformer, target: dict[str, tuple[int, ...]], spec: str, prefix: str = "backbone."
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """SPEC's backbone tensors renamed to `prefix + key`, fitted to `target` shapes (module doc)."""
    sd = source.state_dict()
    extra = sorted(set(sd) - set(target))
    wrong = []
    tensors, resized, fresh = {}, {}, []
    for key, shape in target.items():
        if key not in sd:
            fresh.append(prefix + key)
        elif tuple(sd[key].shape) == shape:
            tensors[prefix + key] = sd[key]
        elif key == "pos_embed" and _grid(shape) and sd[key].shape[-1] == shape[-1]:
            with torch.no_grad():
                tensors[prefix + key] = source.interpolate_pos_embed(_grid(shape), _grid(shape))
            resized[prefix + key] = [list(sd[key].shape), list(shape)]
        else:
            wrong.append(f"{key}: SPEC {tuple(sd[key].shape)} vs recipe {shape}")
    if wrong or extra:
        parts = ([f"shape mismatch: {_short(wrong, 4)}"] if wrong else []) + (
            [f"tensors the recipe's backbone has no place for: {_short(extra)}"] if extra else []
        )
        raise InitMismatchError(f"{spec} does not fit the recipe's backbone: {' | '.join(parts)}; {arch_hint(source)}")
    report = InitReport(spec=spec, loaded=sorted(tensors), resized=resized, fresh=fresh)
    return tensors, report


# ---------------------------------------------------------------- heads of an lvd run


def lvd_run_heads(spec: str, target: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], str]:
    """The teacher heads an lvd run saved, for the head keys of `target` (`dino_head.*`,
    `ibot_head.*`) that it has; ({}, why) when SPEC is no lvd run or saved none."""
    from lvd.pretrain import checkpoint as ckpt

    path = Path(spec).expanduser()
    last = ckpt.latest_checkpoint(path) if path.is_dir() else None
    if last is None:
        return {}, "fresh (SPEC holds a backbone only)"
    saved = ckpt.read_dcp_metadata(last / ckpt.DCP_METADATA).state_dict_metadata
    wanted = {k: s for k, s in target.items() if k.split(".", 1)[0] in HEADS}
    found = {k: s for k, s in wanted.items() if f"teacher.{k}" in saved}
    if not found:
        return {}, f"fresh ({last} saved no heads)"
    wrong = [
        f"{k}: SPEC {tuple(saved[f'teacher.{k}'].size)} vs recipe {s}"
        for k, s in found.items()
        if tuple(saved[f"teacher.{k}"].size) != s
    ]
    for head in HEADS:  # a head is taken whole or not at all
        mine = [k for k in wanted if k.startswith(head + ".")]
        have = [k for k in mine if k in found]
        if have and len(have) != len(mine):
            wrong.append(f"{head}: SPEC lacks {_short(sorted(set(mine) - set(have)))}")
    if wrong:
        raise InitMismatchError(
            f"{spec}: the run's heads do not fit the recipe's: "
            f"{'; '.join(wrong)}; set the run's head sizes (--config "
            f"{path}/config.json, or --set dino_head.n_prototypes=...)"
        )
    state = {"teacher": {k: torch.empty(s) for k, s in found.items()}}
    ckpt._dcp_load(state, last)  # the restricted reader of checkpoint.py (no pickled code)
    heads = sorted({k.split(".", 1)[0] for k in found})
    return state["teacher"], f"from {last} ({', '.join(heads)})"


# ---------------------------------------------------------------- the student start


def init_weights(spec: str | Path, recipe: Recipe) -> StartWeights:
    """Student (and teacher) start tensors from SPEC for `recipe`, and the report."""
    from lvd.pretrain.meta_arch import build_student

    spec = str(spec)
    with torch.device("meta"):
        target = _shapes(build_student(recipe))
    backbone_target = {k[len("backbone.") :]: s for k, s in target.items() if k.startswith("backbone.")}
    tensors, report = match_backbone(load_backbone(spec), backbone_target, spec)
    heads, how = lvd_run_heads(spec, target)
    fresh = report.fresh + sorted(k for k in target if not k.startswith("backbone.") and k not in heads)
    report = InitReport(spec=spec, loaded=sorted([*tensors, *heads]), resized=report.resized, fresh=fresh, heads=how)
    return StartWeights({**tensors, **heads}, report)


def apply_start(meta, start: StartWeights) -> None:
    """Student and EMA teacher both from SPEC (the teacher starts as the student's copy)."""
    meta.copy_in("student", start.tensors)
    meta.copy_in("teacher", start.tensors)
