"""DINOv2 student / EMA teacher and one training step's forward, split in three parts.

`teacher_targets` (no grad: centred or Sinkhorn teacher probabilities for the CLS and masked
patch tokens), `student_outputs` (head logits of all crops), `loss_terms` (DINO over crop
pairs, iBOT on masked patches of the global crops, KoLeo on the backbone CLS of each global
crop). The loop owns backward, optimizer and parallelism; this module stays plain torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from lvd.pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from lvd.pretrain.models.vit import VisionTransformer, ViTConfig
from lvd.pretrain.parallel import local_tensors, reshard
from lvd.pretrain.recipes import Recipe


@dataclass(frozen=True)
class TeacherTargets:
    dino_probs_GBK: torch.Tensor
    ibot_probs_MK: torch.Tensor | None


@dataclass(frozen=True)
class StudentOutputs:
    global_logits_GBK: torch.Tensor
    local_logits_LBK: torch.Tensor | None
    ibot_logits_MK: torch.Tensor | None
    global_cls_GBD: torch.Tensor


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    dino: torch.Tensor
    ibot: torch.Tensor
    koleo: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """The four terms on the host: one device-to-host copy (one sync) per step, however
        often it is asked for (the finite check, then the log)."""
        return dict(self._floats)

    @cached_property
    def _floats(self) -> dict[str, float]:
        terms = (self.total, self.dino, self.ibot, self.koleo)
        values = torch.stack([torch.as_tensor(t).detach().float().reshape(()) for t in terms]).tolist()
        return dict(zip(("loss", "dino_loss", "ibot_loss", "koleo_loss"), values))


@dataclass(frozen=True)
class StepOutput:
    losses: LossTerms
    entropy: float  # mean teacher CLS distribution entropy (nats); collapse -> 0 or log K
    proto_usage: float  # fraction of prototypes that are some teacher crop's argmax


def build_heads(recipe: Recipe, embed_dim: int) -> dict[str, nn.Module]:
    """The recipe's DINO head (and iBOT head when separate) on `embed_dim`-wide tokens."""
    heads = {"dino_head": recipe.dino_head.build(embed_dim)}
    if recipe.loss.separate_ibot_head:
        heads["ibot_head"] = recipe.ibot_head.build(embed_dim)
    return heads


def build_student(recipe: Recipe) -> nn.ModuleDict:
    backbone = recipe.backbone.build(img_size=recipe.crops.global_size)
    return nn.ModuleDict({"backbone": backbone, **build_heads(recipe, backbone.embed_dim)})


def build_frozen_teacher(recipe: Recipe, config: ViTConfig) -> nn.ModuleDict:
    """A distillation teacher of architecture `config`, with heads of the recipe's shapes."""
    backbone = VisionTransformer.from_config(config)
    return nn.ModuleDict({"backbone": backbone, **build_heads(recipe, backbone.embed_dim)})


class MetaArch(nn.Module):
    """Student, its EMA teacher and the losses; with `frozen_teacher` (a ViTConfig) also a
    frozen distillation teacher, which then gives the targets instead of the EMA teacher
    (the EMA is kept: DINOv2 releases the student's EMA of a distillation)."""

    def __init__(self, recipe: Recipe, *, frozen_teacher: ViTConfig | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.student = build_student(recipe)
        # The teacher starts as an exact copy and only ever moves by EMA; eval mode keeps
        # stochastic depth off in it.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.frozen_teacher = None
        if frozen_teacher is not None:
            self.frozen_teacher = build_frozen_teacher(recipe, frozen_teacher)
            self.frozen_teacher.requires_grad_(False).eval()
        lc = recipe.loss
        self.dino_loss = DINOLoss(
            recipe.dino_head.n_prototypes, student_temp=lc.student_temp, center_momentum=lc.center_momentum
        )
        ibot_k = (recipe.ibot_head if lc.separate_ibot_head else recipe.dino_head).n_prototypes
        self.ibot_loss = iBOTPatchLoss(ibot_k, student_temp=lc.student_temp, center_momentum=lc.center_momentum)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> MetaArch:
        super().train(mode)
        self.teacher.eval()
        if self.frozen_teacher is not None:
            self.frozen_teacher.eval()
        return self

    @property
    def distilling(self) -> bool:
        return self.frozen_teacher is not None

    @property
    def target_model(self) -> nn.ModuleDict:
        """Whose outputs are the targets: the frozen teacher when distilling, else the EMA."""
        return self.frozen_teacher if self.frozen_teacher is not None else self.teacher

    @torch.no_grad()
    def copy_in(self, part: str, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite entries of `part`'s state dict ("student", "teacher", "frozen_teacher")
        with `tensors` (same keys and shapes). A no-op on a model built on the meta device:
        under FSDP2 only rank 0's real model is filled, the other ranks receive its values."""
        target = getattr(self, part).state_dict()
        for key, value in tensors.items():
            if target[key].is_meta:
                return
            target[key].copy_(value)

    @staticmethod
    def _ibot_head(model: nn.ModuleDict) -> nn.Module:
        return model["ibot_head"] if "ibot_head" in model else model["dino_head"]

    def _teacher_probs(self, loss: DINOLoss | iBOTPatchLoss, logits_NK: torch.Tensor, temp: float) -> torch.Tensor:
        if self.recipe.loss.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp_teacher(logits_NK, temp)
        probs = loss.softmax_center_teacher(logits_NK, temp)
        loss.update_center(logits_NK)
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch, teacher_temp: float) -> TeacherTargets:
        model = self.target_model
        out = model["backbone"](batch.global_crops)
        logits_NK = model["dino_head"](out.cls_BD)
        dino_probs = self._teacher_probs(self.dino_loss, logits_NK, teacher_temp)
        ibot_probs = None
        if batch.mask_indices.numel():
            masked_MD = out.patches_BND.flatten(0, 1)[batch.mask_indices]
            ibot_logits = self._ibot_head(model)(masked_MD)
            ibot_probs = self._teacher_probs(self.ibot_loss, ibot_logits, teacher_temp)
        reshard(model)  # see parallel.reshard; frees the teacher during backward
        return TeacherTargets(dino_probs.unflatten(0, (batch.n_global, -1)), ibot_probs)

    def student_outputs(self, batch) -> StudentOutputs:
        backbone, head = self.student["backbone"], self.student["dino_head"]
        # Distilling, the student sees whole global crops and matches the teacher's patch
        # targets at the sampled positions (dinov3 passes no masks to a distilled student)
        glob = backbone(batch.global_crops, masks_BN=None if self.distilling else batch.masks)
        local_logits = None
        if batch.n_local:
            local_cls = backbone(batch.local_crops).cls_BD
            local_logits = head(local_cls).unflatten(0, (batch.n_local, batch.n_images))
        ibot_logits = None
        if batch.mask_indices.numel():
            masked_MD = glob.patches_BND.flatten(0, 1)[batch.mask_indices]
            ibot_logits = self._ibot_head(self.student)(masked_MD)
        return StudentOutputs(
            global_logits_GBK=head(glob.cls_BD).unflatten(0, (batch.n_global, batch.n_images)),
            local_logits_LBK=local_logits,
            ibot_logits_MK=ibot_logits,
            global_cls_GBD=glob.cls_BD.unflatten(0, (batch.n_global, batch.n_images)),
        )

    def loss_terms(self, student: StudentOutputs, teacher: TeacherTargets, batch) -> LossTerms:
        lc = self.recipe.loss
        dino = self.dino_loss(student.global_logits_GBK, student.local_logits_LBK, teacher.dino_probs_GBK)
        ibot = student.global_logits_GBK.new_zeros((), dtype=torch.float32)
        if student.ibot_logits_MK is not None:
            ibot = self.ibot_loss(
                student.ibot_logits_MK, teacher.ibot_probs_MK, batch.mask_weights, n_crops=batch.global_crops.shape[0]
            )
        # KoLeo per global crop, so two views of one image are never nearest neighbours
        koleo = sum(self.koleo_loss(cls_BD) for cls_BD in student.global_cls_GBD)
        total = lc.dino_weight * dino + lc.ibot_weight * ibot + lc.koleo_weight * koleo
        return LossTerms(total=total, dino=dino, ibot=ibot, koleo=koleo)

    def step(self, batch, *, teacher_temp: float) -> StepOutput:
        """Forward of one training step; the caller runs `out.losses.total.backward()`."""
        teacher = self.teacher_targets(batch, teacher_temp)
        losses = self.loss_terms(self.student_outputs(batch), teacher, batch)
        return StepOutput(losses, **collapse_monitors(teacher.dino_probs_GBK))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, with foreach kernels. The frozen
        distillation teacher is never updated.

        Under FSDP2 both are sharded the same way, so each rank updates its local shards
        (no communication); in one process `local_tensors` returns the parameters as is.
        """
        reshard(self.teacher)
        t = local_tensors(p.data for p in self.teacher.parameters())
        s = local_tensors(p.data for p in self.student.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def collapse_monitors(probs_GBK: torch.Tensor) -> dict[str, float]:
    probs_NK = probs_GBK.flatten(0, 1).float()
    entropy = -(probs_NK * probs_NK.clamp_min(1e-12).log()).sum(-1).mean()
    used = torch.zeros(probs_NK.shape[1], dtype=torch.bool, device=probs_NK.device)
    used[probs_NK.argmax(-1)] = True
    entropy, usage = torch.stack([entropy, used.float().mean()]).tolist()  # one sync for both
    return {"entropy": entropy, "proto_usage": usage}
