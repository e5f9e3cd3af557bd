"""Named pretraining recipes: frozen, keyword-only configs derived from one base.

Values follow facebookresearch/dinov2 (`configs/ssl_default_config.yaml`, `train/vitl14.yaml`,
`train/vitg14.yaml`): base lr 4e-3 for a batch of 1024 (sqrt-scaled), layer-wise decay 0.9,
65536 prototypes, KoLeo 0.1, 2 global crops at 224 and 8 local at 98 (patch 14). The large
runs (L, g) use the long-schedule settings: 131072 prototypes with a 384-d bottleneck, a
separate iBOT head, Sinkhorn-Knopp centering, base lr 2e-4, no layer-wise decay, 500 epochs.
ViT-L keeps the plain MLP of the released ViT-L/14 (the official vitl14.yaml sets SwiGLU);
ViT-g uses SwiGLU through its architecture. Drop path: S 0.1, B 0.3, L/g 0.4. All use 4
registers. Batch sizes are per GPU (S/B 64, L 32, g 12), as in the official configs.
`tiny` is ours: a ViT-Tiny on 56/28 px crops with a 1024-prototype head, trainable on 2 CPUs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from lvd.pretrain.schedules import ScheduleConfig

CENTERINGS = ("centering", "sinkhorn_knopp")


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    arch: str = "vit_small"  # a key of lvd.pretrain.models.vit.ARCHITECTURES
    patch_size: int = 14
    num_register_tokens: int = 4
    drop_path_rate: float = 0.3
    layerscale_init: float = 1e-5

    def __post_init__(self) -> None:
        from lvd.pretrain.models.vit import ARCHITECTURES

        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        if self.patch_size < 1 or self.num_register_tokens < 0:
            raise ValueError(f"need patch_size >= 1 and num_register_tokens >= 0, got {self}")

    def build(self, *, img_size: int = 224):
        """The student backbone; `img_size` sets the native position-embedding grid."""
        from lvd.pretrain.models.vit import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[self.arch](
            img_size=img_size,
            patch_size=self.patch_size,
            drop_path_uniform=True,  # DINOv2 default: the same rate in every block
            num_register_tokens=self.num_register_tokens,
            drop_path_rate=self.drop_path_rate,
            layerscale_init=self.layerscale_init,
        )


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3

    def build(self, in_dim: int):
        from lvd.pretrain.losses import DINOHead

        return DINOHead(
            in_dim=in_dim,
            out_dim=self.n_prototypes,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            nlayers=self.n_layers,
        )


@dataclass(frozen=True, kw_only=True)
class CropsConfig:
    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)

    def __post_init__(self) -> None:
        if self.n_local < 0 or self.global_size < 1 or self.local_size < 1:
            raise ValueError(f"need n_local >= 0 and crop sizes >= 1, got {self}")
        for name, (lo, hi) in (("global_scale", self.global_scale), ("local_scale", self.local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {(lo, hi)}")


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    sample_probability: float = 0.5  # share of global crops that get masked
    ratio_min: float = 0.1
    ratio_max: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio_min <= self.ratio_max < 1.0:
            raise ValueError(f"need 0 <= ratio_min <= ratio_max < 1, got {self}")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "centering"  # or "sinkhorn_knopp"
    separate_ibot_head: bool = False

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    base_lr: float = 4e-3  # for a global batch of 1024; scaled by sqrt(batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    beta1: float = 0.9
    beta2: float = 0.999
    freeze_last_layer_epochs: float = 1


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    momentum: float = 0.992
    momentum_end: float = 1.0
    temp_start: float = 0.04
    temp: float = 0.07
    temp_warmup_epochs: float = 30


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Distillation from a frozen teacher, as DINOv2 made its ViT-S/B/L from ViT-g (see
    lvd/pretrain/distill.py). `teacher` is a backbone SPEC (official .pth, HF folder, lvd run);
    empty means self-distillation from the EMA teacher. `teacher_arch` names the pair a recipe
    was made for: the loaded teacher must have that architecture's width and depth."""

    teacher: str = ""
    teacher_arch: str = ""  # "" accepts any teacher; else a key of models.vit.ARCHITECTURES

    def __post_init__(self) -> None:
        from lvd.pretrain.models.vit import ARCHITECTURES

        if self.teacher_arch and self.teacher_arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown teacher_arch {self.teacher_arch!r}; choose one of {sorted(ARCHITECTURES)} or '' (any)"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """A phase that continues another lvd run (lvd/pretrain/highres.py): student, teacher,
    heads and loss centres start from `from_run`'s last checkpoint, position embeddings
    interpolated to this recipe's global crops; AdamW and the schedules start over. DINOv2's
    high-resolution adaptation is such a phase (`lvd pretrain --highres-from RUN`)."""

    from_run: str = ""  # an lvd run folder or step_NNNNNNN checkpoint; "": a run of its own


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)  # used if separate_ibot_head
    crops: CropsConfig = field(default_factory=CropsConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    batch_size: int = 64  # per rank
    epochs: int = 100
    epoch_length: int = 1250  # iterations per "epoch" (DINOv2's OFFICIAL_EPOCH_LENGTH)
    checkpoint_every: int = 2500
    keep_checkpoints: int = 3
    log_every: int = 10

    def __post_init__(self) -> None:
        for size in (self.crops.global_size, self.crops.local_size):
            if size % self.backbone.patch_size:
                raise ValueError(
                    f"crop size {size} is not a multiple of patch size "
                    f"{self.backbone.patch_size}; pick crop sizes like 224/98 for patch 14"
                )
        if self.batch_size < 1 or self.epochs < 1 or self.epoch_length < 1:
            raise ValueError("batch_size, epochs and epoch_length must all be >= 1")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every, keep_checkpoints and log_every must be >= 1")

    @property
    def total_iters(self) -> int:
        return self.epochs * self.epoch_length

    def schedule_config(self, *, world_size: int = 1) -> ScheduleConfig:
        o, t = self.optim, self.teacher
        return ScheduleConfig(
            total_iters=self.total_iters,
            epoch_length=self.epoch_length,
            global_batch_size=self.batch_size * world_size,
            base_lr=o.base_lr,
            min_lr=o.min_lr,
            warmup_epochs=o.warmup_epochs,
            weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end,
            momentum=t.momentum,
            momentum_end=t.momentum_end,
            teacher_temp_start=t.temp_start,
            teacher_temp=t.temp,
            teacher_temp_warmup_epochs=t.temp_warmup_epochs,
            freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            sub = _SECTIONS.get(f.name)
            kwargs[f.name] = _section_from_dict(sub, value) if sub else value
        return cls(**kwargs)


_SECTIONS = {
    "backbone": BackboneConfig,
    "dino_head": HeadConfig,
    "ibot_head": HeadConfig,
    "crops": CropsConfig,
    "masks": MaskConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "teacher": TeacherConfig,
    "distill": DistillConfig,
    "phase": PhaseConfig,
}


def _section_from_dict(cls, d: dict[str, Any]):
    # JSON turns tuples into lists; the frozen configs want tuples back.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# -- named recipes -------------------------------------------------------------------------


def vits14() -> Recipe:
    return Recipe(name="vits14", backbone=BackboneConfig(arch="vit_small", drop_path_rate=0.1))


def vitb14() -> Recipe:
    return replace(vits14(), name="vitb14", backbone=BackboneConfig(arch="vit_base", drop_path_rate=0.3))


def _long_schedule(base: Recipe, *, name: str, arch: str, batch_size: int) -> Recipe:
    """DINOv2's ViT-L/g settings (train/vitl14.yaml, train/vitg14.yaml)."""
    big_head = HeadConfig(n_prototypes=131072, bottleneck_dim=384)
    return replace(
        base,
        name=name,
        batch_size=batch_size,
        epochs=500,
        backbone=BackboneConfig(arch=arch, drop_path_rate=0.4),
        dino_head=big_head,
        ibot_head=big_head,
        loss=replace(base.loss, centering="sinkhorn_knopp", separate_ibot_head=True),
        optim=replace(base.optim, base_lr=2e-4, warmup_epochs=80, weight_decay_end=0.2, layerwise_decay=1.0),
        teacher=replace(base.teacher, momentum=0.994),
    )


def vitl14() -> Recipe:
    return _long_schedule(vits14(), name="vitl14", arch="vit_large", batch_size=32)


def vitg14() -> Recipe:
    return _long_schedule(vits14(), name="vitg14", arch="vit_giant2", batch_size=12)


def tiny() -> Recipe:
    """A ViT-Tiny on 56/28 px crops: minutes on 2 CPU cores, for tests and benchmarks.

    Two departures from the official values, for runs of a few hundred steps: LayerScale
    starts at 1 (at 1e-5 the blocks start as near-identities, every CLS token is alike and
    the centred teacher stays uniform, entropy = log K with one prototype used, for 200+
    steps), and Sinkhorn-Knopp centring, which kept ~90% of the possible prototypes in use
    from the first steps in our Fashion-MNIST runs.
    """
    small_head = HeadConfig(n_prototypes=1024, hidden_dim=256, bottleneck_dim=64)
    base = vits14()
    return replace(
        base,
        name="tiny",
        batch_size=32,
        epochs=10,
        epoch_length=100,
        checkpoint_every=200,
        log_every=10,
        backbone=BackboneConfig(arch="vit_tiny", drop_path_rate=0.0, layerscale_init=1.0),
        dino_head=small_head,
        ibot_head=small_head,
        loss=replace(base.loss, centering="sinkhorn_knopp"),
        crops=replace(base.crops, global_size=56, local_size=28, n_local=2),
        optim=replace(base.optim, warmup_epochs=1, layerwise_decay=1.0),
        teacher=replace(base.teacher, temp_warmup_epochs=2),
    )


def _distilled(student: Recipe, *, name: str, teacher: Recipe) -> Recipe:
    """`student` trained from a frozen `teacher` (DINOv2 section 5; dinov3's distillation
    code): no stochastic depth in the student, and the teacher's head shapes (the targets
    are the teacher's own prototypes, so the student's heads need the same number)."""
    return replace(
        student,
        name=name,
        backbone=replace(student.backbone, drop_path_rate=0.0),
        dino_head=teacher.dino_head,
        ibot_head=teacher.ibot_head,
        loss=replace(
            student.loss, centering=teacher.loss.centering, separate_ibot_head=teacher.loss.separate_ibot_head
        ),
        distill=DistillConfig(teacher_arch=teacher.backbone.arch),
    )


def vits14_distill() -> Recipe:
    """ViT-S/14 from a ViT-g/14 teacher (--distill-from dinov2_vitg14[_reg4]_pretrain.pth)."""
    return _distilled(vits14(), name="vits14_distill", teacher=vitg14())


def vitb14_distill() -> Recipe:
    return _distilled(vitb14(), name="vitb14_distill", teacher=vitg14())


def vitl14_distill() -> Recipe:
    return _distilled(vitl14(), name="vitl14_distill", teacher=vitg14())


def tiny_distill() -> Recipe:
    """`tiny` (ViT-Tiny, 192 wide) from a wider ViT-S teacher trained with `tiny`'s heads and
    crops (e.g. `lvd pretrain --recipe tiny --set backbone.arch=vit_small`): CPU-sized."""
    teacher = replace(tiny(), backbone=replace(tiny().backbone, arch="vit_small"))
    return _distilled(tiny(), name="tiny_distill", teacher=teacher)


RECIPES: dict[str, Callable[[], Recipe]] = {
    "vits14": vits14,
    "vitb14": vitb14,
    "vitl14": vitl14,
    "vitg14": vitg14,
    "tiny": tiny,
    "vits14_distill": vits14_distill,
    "vitb14_distill": vitb14_distill,
    "vitl14_distill": vitl14_distill,
    "tiny_distill": tiny_distill,
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()
