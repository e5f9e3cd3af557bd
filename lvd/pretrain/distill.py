"""Distillation as DINOv2 made its ViT-S/B/L from ViT-g: a frozen teacher gives the targets.

What we follow. The DINOv2 paper (section 5, "Distillation of smaller models") trains the
student with the usual loop, except: a larger model as a frozen teacher, a spare EMA of the
student kept as the final model, no masking and no stochastic depth, and the iBOT loss on
the two global crops. The April-2023 `dinov2` package has no distillation code; dinov3's
`ssl_meta_arch.py` (`distillation.enabled`) does it that way, and we follow it:
- the teacher (backbone and its own DINO / iBOT heads, loaded from the checkpoint) is never
  trained nor EMA-updated, and runs in eval mode; its head shapes must equal the student's
  (the student learns the teacher's prototypes), so `*_distill` recipes copy the teacher
  recipe's heads and centring;
- the student gets unmasked global crops; the iBOT loss still compares student and teacher
  patch tokens at the sampled mask positions;
- the student runs without stochastic depth (`_distilled` in recipes.py);
- `MetaArch.teacher` stays the EMA of the student: checkpoints, pictures and k-NN use it.
Heads: from an lvd run, the teacher's heads are read from its checkpoint. Official hub files
and HF folders hold a backbone only; the teacher's heads then start at random and stay
frozen (a fixed random projection of the teacher's tokens: the student still learns the
teacher's geometry, but not its trained prototypes), reported in OUT/distill.json.
The teacher must use the student's patch size: iBOT pairs their patch tokens one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lvd.pretrain.init import InitMismatchError, InitReport, _shapes, lvd_run_heads, match_backbone
from lvd.pretrain.models.load import load_backbone
from lvd.pretrain.models.vit import ARCHITECTURES, ViTConfig
from lvd.pretrain.recipes import DistillConfig, Recipe


@dataclass(frozen=True)
class FrozenTeacher:
    """A distillation teacher's architecture, its tensors (keys of the frozen ModuleDict's
    state dict) and where they came from."""

    config: ViTConfig
    tensors: dict[str, torch.Tensor]
    report: InitReport


def _check_pair(recipe: Recipe, config: ViTConfig, spec: str) -> None:
    arch = recipe.distill.teacher_arch
    if config.patch_size != recipe.backbone.patch_size:
        raise InitMismatchError(
            f"distillation teacher {spec} uses patch {config.patch_size}, the student "
            f"{recipe.backbone.patch_size}: iBOT pairs their patch tokens, so both need the "
            f"same (--set backbone.patch_size={config.patch_size} and crop sizes to match)"
        )
    if not arch:
        return
    with torch.device("meta"):
        want = ARCHITECTURES[arch]()
    if (want.embed_dim, len(want.blocks)) != (config.embed_dim, config.depth):
        raise InitMismatchError(
            f"recipe {recipe.name} distils from a {arch} teacher ({want.embed_dim} wide, "
            f"{len(want.blocks)} deep); {spec} is {config.embed_dim} wide, {config.depth} deep: "
            "pass such a teacher, or accept any with --set distill.teacher_arch="
        )


def load_frozen_teacher(recipe: Recipe) -> FrozenTeacher:
    """The teacher `recipe.distill.teacher` names, checked against the recipe's pair."""
    from lvd.pretrain.meta_arch import build_frozen_teacher

    spec = recipe.distill.teacher
    source = load_backbone(spec)
    config = replace(source.config, drop_path_rate=0.0)
    _check_pair(recipe, config, spec)
    with torch.device("meta"):
        target = _shapes(build_frozen_teacher(recipe, config))
    backbone_target = {k[len("backbone.") :]: s for k, s in target.items() if k.startswith("backbone.")}
    tensors, report = match_backbone(source, backbone_target, spec)  # same config: all load
    heads, how = lvd_run_heads(spec, target)
    fresh = sorted(k for k in target if not k.startswith("backbone.") and k not in heads)
    report = InitReport(spec=spec, loaded=sorted([*tensors, *heads]), fresh=fresh, heads=how)
    return FrozenTeacher(config, {**tensors, **heads}, report)


def apply_frozen(meta, teacher: FrozenTeacher) -> None:
    meta.copy_in("frozen_teacher", teacher.tensors)


def refuse_unset_teacher(recipe: Recipe) -> None:
    """A `*_distill` recipe names a pair but no weights: say how to give them."""
    if recipe.distill.teacher_arch and not recipe.distill.enabled:
        raise ValueError(
            f"recipe {recipe.name} distils from a frozen {recipe.distill.teacher_arch} "
            "teacher: pass its weights with --distill-from SPEC (an official .pth, "
            "an HF folder or an lvd run)"
        )


def distilled(student: Recipe, teacher: str | Path, *, teacher_arch: str = "") -> Recipe:
    """`student` distilled from the frozen teacher SPEC `teacher` (Python form of
    `--distill-from`); with the student's drop path off, as in the official recipe."""
    return replace(
        student,
        backbone=replace(student.backbone, drop_path_rate=0.0),
        distill=DistillConfig(teacher=str(teacher), teacher_arch=teacher_arch),
    )
