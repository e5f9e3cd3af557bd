"""The DINOv2 training loop: `train(TrainConfig) -> TrainResult`.

Per step: schedules -> forward (teacher targets, student outputs, losses) -> finite check ->
backward -> freeze prototypes / clip -> AdamW -> EMA teacher -> log -> checkpoint.
Outputs under OUT: `config.json` (the recipe, overrides applied), `init.json` / `distill.json`
(with `--init` / a distillation teacher: which tensors were loaded, resized or started fresh),
`phase.json` (a phase continuing a run, e.g. --highres-from: what was loaded and interpolated),
`metrics.jsonl` (rank 0 writes a JSON line
per logged step: its losses, and the corrupt samples of all ranks), `checkpoints/step_NNNNNNN/`
(DCP, see checkpoint.py), `pictures/step_NNNNNNN.png`, `ranks/rankR.pid` (pid and host of
each rank while it trains; a file left behind names a rank that died). Shards and a resume's
checkpoint (recipe, world size) are checked before the model is built, so bad inputs fail in
seconds; failures.py holds those checks and the out-of-memory message.
A resumed run restores models, optimizer, centres, RNG and data position, and continues
with exactly the losses an uninterrupted run would have had (deterministic mode, CPU).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.data.plan import DataPlan, checkpoint_data, plan_for
from lvd.pretrain.data.shard_stream import expand_shards
from lvd.pretrain.distill import FrozenTeacher, apply_frozen, load_frozen_teacher, refuse_unset_teacher
from lvd.pretrain.distributed import all_ranks_mean, init_distributed
from lvd.pretrain.failures import (  # NonFiniteLossError: re-exported for callers of train
    NonFiniteLossError,
    check_shard_files,
    checked_resume_point,
    oom_message,
)
from lvd.pretrain.highres import PhaseStart, apply_phase_start, start_of_run
from lvd.pretrain.init import StartWeights, apply_start, init_weights
from lvd.pretrain.meta_arch import MetaArch, StepOutput
from lvd.pretrain.optim import (
    apply_schedules,
    build_adamw,
    clip_gradients,
    param_groups,
    zero_last_layer_grads,
)
from lvd.pretrain.parallel import Runtime, parallelize, setup_runtime, unsharded_copy
from lvd.pretrain.pictures import write_pictures
from lvd.pretrain.recipes import Recipe
from lvd.pretrain.schedules import ScheduleValues, build_schedules

N_PICTURE_IMAGES = 4


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    shards: tuple[str, ...]
    recipe: Recipe
    out: Path
    max_steps: int | None = None  # stop early; schedules still span the recipe's length
    resume: bool = False
    num_workers: int = 0
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    deterministic: bool = False  # torch deterministic algorithms (exact resume on CPU)
    pictures: bool = True
    init: str | None = None  # start from these backbone weights (init.py); not on resume

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("no shards given; pass --shards RUN/shards (curation output)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def end_step(self) -> int:
        total = self.recipe.total_iters
        return total if self.max_steps is None else min(self.max_steps, total)


@dataclass(frozen=True)
class TrainResult:
    out: Path
    start_step: int
    end_step: int
    last_checkpoint: Path | None
    losses: list[dict[str, float]] = field(default_factory=list)  # one per step of this call


def _make_loader(cfg: TrainConfig, rt: Runtime, start_batch: int, plan: DataPlan) -> Iterator:
    from lvd.pretrain.data import MaskingConfig, MultiCropConfig, make_dataloader

    r = cfg.recipe
    crops = MultiCropConfig(
        global_size=r.crops.global_size,
        local_size=r.crops.local_size,
        n_local=r.crops.n_local,
        global_scale=r.crops.global_scale,
        local_scale=r.crops.local_scale,
    )
    masking = MaskingConfig(
        sample_probability=r.masks.sample_probability,
        ratio_min=r.masks.ratio_min,
        ratio_max=r.masks.ratio_max,
        patch_size=r.backbone.patch_size,
    )
    return iter(
        make_dataloader(
            list(cfg.shards),
            batch_size=r.batch_size,
            rank=rt.rank,
            world_size=rt.world_size,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            crops=crops,
            masking=masking,
            start_batch=start_batch,
            plan=plan,
        )
    )


def _state(meta: MetaArch, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    student_sd, optim_sd = get_state_dict(meta.student, optimizer)
    return {
        "student": student_sd,
        "teacher": meta.teacher.state_dict(),
        "optimizer": optim_sd,
        "dino_loss": meta.dino_loss.state_dict(),
        "ibot_loss": meta.ibot_loss.state_dict(),
    }


def _restore(meta: MetaArch, optimizer: torch.optim.Optimizer, path: Path) -> ckpt.CheckpointMeta:
    state = _state(meta, optimizer)
    info = ckpt.load_checkpoint(path, state)
    set_model_state_dict(meta.student, state["student"])
    # Not strict: a parameter that had no AdamW state when saved (the frozen prototypes)
    # has none in the checkpoint; drop the placeholder state get_state_dict created for it
    # so the resumed optimizer matches the saved one exactly.
    set_optimizer_state_dict(meta.student, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    saved = set(state["optimizer"]["state"])
    for name, p in meta.student.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)
    meta.teacher.load_state_dict(state["teacher"])
    meta.dino_loss.load_state_dict(state["dino_loss"])
    meta.ibot_loss.load_state_dict(state["ibot_loss"])
    return info


def check_finite(out: StepOutput, step: int) -> None:
    terms = out.losses.as_floats()
    if not all(math.isfinite(v) for v in terms.values()):
        shown = ", ".join(f"{k}={v}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {shown}; lower the learning rate (--set "
            "optim.base_lr=...) or check the data (a diverging teacher temperature, --set "
            "teacher.temp=..., or an empty batch can also cause this)"
        )


class MetricsLog:
    """OUT/metrics.jsonl; on resume, lines from steps at or after the resume step are dropped."""

    def __init__(self, path: Path, *, resume_step: int) -> None:
        self.path = path
        kept = []
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _train_step(meta: MetaArch, optimizer, batch, v: ScheduleValues, step: int, rt: Runtime) -> StepOutput:
    apply_schedules(optimizer, lr=v.lr, weight_decay=v.weight_decay, last_layer_lr=v.last_layer_lr)
    with rt.autocast():
        out = meta.step(batch, teacher_temp=v.teacher_temp)
    check_finite(out, step)
    optimizer.zero_grad(set_to_none=True)
    out.losses.total.backward()
    zero_last_layer_grads(optimizer)
    clip_gradients(dict(meta.student.items()), meta.recipe.optim.clip_grad)
    optimizer.step()
    meta.update_teacher(v.momentum)
    return out


def _save(
    cfg: TrainConfig, meta: MetaArch, optimizer, step: int, rt: Runtime, picture_x: torch.Tensor | None, plan: DataPlan
) -> Path:
    info = ckpt.CheckpointMeta(
        step=step,
        data_batches=step,
        world_size=rt.world_size,
        recipe=cfg.recipe.to_dict(),
        data=checkpoint_data(plan, step),
    )
    path = ckpt.save_checkpoint(cfg.out, _state(meta, optimizer), info, keep=cfg.recipe.keep_checkpoints)
    if cfg.pictures and picture_x is not None:
        # a sharded teacher cannot run on rank 0 alone: gather a plain copy there
        backbone = unsharded_copy(
            meta.teacher["backbone"], lambda: cfg.recipe.backbone.build(img_size=cfg.recipe.crops.global_size), rt
        )
        if rt.rank == 0:
            write_pictures(backbone, picture_x, cfg.out / "pictures", f"step_{step:07d}")
    return path


def _build(
    recipe: Recipe,
    rt: Runtime,
    start: StartWeights | None = None,
    frozen: FrozenTeacher | None = None,
    phase: PhaseStart | None = None,
):
    def build() -> MetaArch:
        meta = MetaArch(recipe, frozen_teacher=None if frozen is None else frozen.config)
        if start is not None:
            apply_start(meta, start)
        if phase is not None:
            apply_phase_start(meta, phase)
        if frozen is not None:
            apply_frozen(meta, frozen)
        return meta

    meta = parallelize(build, rt)
    optimizer = build_adamw(
        param_groups(
            dict(meta.student.items()),
            depth=len(meta.student["backbone"].blocks),
            layerwise_decay=recipe.optim.layerwise_decay,
            patch_embed_lr_mult=recipe.optim.patch_embed_lr_mult,
        ),
        beta1=recipe.optim.beta1,
        beta2=recipe.optim.beta2,
    )
    return meta, optimizer


def _write_pid(out: Path, rank: int) -> Path:
    path = out / "ranks" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n{socket.gethostname()}\n")
    os.replace(tmp, path)  # whoever reads it sees a whole file
    return path


def _step_or_explain(meta: MetaArch, optimizer, batch, v: ScheduleValues, step: int, rt: Runtime) -> StepOutput:
    try:
        return _train_step(meta, optimizer, batch, v, step, rt)
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(
            oom_message(
                meta.recipe,
                world_size=rt.world_size,
                step=step,
                bf16=rt.autocast_dtype == torch.bfloat16,
                device=rt.device,
            )
        ) from e


def _start_weights(cfg: TrainConfig, rt: Runtime, *, resuming: bool):
    """`--init` weights (a fresh run only: a resume restores its checkpoint) and the frozen
    distillation teacher (every run: it is not checkpointed); rank 0 reports both."""
    refuse_unset_teacher(cfg.recipe)
    start = init_weights(cfg.init, cfg.recipe) if cfg.init and not resuming else None
    frozen = load_frozen_teacher(cfg.recipe) if cfg.recipe.distill.enabled else None
    if rt.rank == 0:
        cfg.out.mkdir(parents=True, exist_ok=True)
        for name, what in (("init", start), ("distill", frozen)):
            if what is not None:
                what.report.write(cfg.out / f"{name}.json")
                print(f"lvd pretrain: {name}: {what.report.summary()}", flush=True)
        if cfg.init and resuming:
            print(f"lvd pretrain: --init {cfg.init} not used: resuming from a checkpoint", flush=True)
    return start, frozen


def train(cfg: TrainConfig) -> TrainResult:
    rt = setup_runtime(init_distributed(cfg.device))
    check_shard_files(cfg.shards[rt.rank :: rt.world_size])  # together: each shard read once
    last = checked_resume_point(cfg.out, cfg.resume, cfg.recipe, rt.world_size)
    torch.use_deterministic_algorithms(cfg.deterministic)
    recipe = cfg.recipe
    weights, frozen = _start_weights(cfg, rt, resuming=last is not None)
    # a phase continuing another run (recipe.phase, e.g. --highres-from): its weights
    phase = start_of_run(recipe, init=cfg.init, rank=rt.rank, resuming=last is not None, out=cfg.out)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 needs it)
    meta, optimizer = _build(recipe, rt, weights, frozen, phase)
    torch.manual_seed(cfg.seed + rt.rank)  # then each rank its own stream
    schedules = build_schedules(recipe.schedule_config(world_size=rt.world_size))
    start = 0 if last is None else _restore(meta, optimizer, last).step
    pid_file = _write_pid(cfg.out, rt.rank)  # ready: built, restored, about to train
    # one writer: every rank appending its own lines made the log ambiguous
    metrics = None
    if rt.rank == 0:
        (cfg.out / "config.json").write_text(recipe.to_json())
        metrics = MetricsLog(cfg.out / "metrics.jsonl", resume_step=start)

    meta.train()
    # the checkpoint's data plan remapped to this layout (any world size: data/plan.py)
    plan = plan_for(
        None if last is None else ckpt.read_meta(last).data,
        step=start,
        n_shards=len(expand_shards(cfg.shards)),
        world_size=rt.world_size,
        workers=cfg.num_workers,
        batch_size=recipe.batch_size,
    )
    loader = _make_loader(cfg, rt, start, plan)
    losses, picture_x, window, corrupt, tick = [], None, 0, 0, time.perf_counter()
    for step in range(start, cfg.end_step):
        batch = next(loader).to(rt.device)
        if picture_x is None:
            picture_x = batch.global_crops[:N_PICTURE_IMAGES].detach().clone()
        v = schedules.at(step)
        out = _step_or_explain(meta, optimizer, batch, v, step, rt)
        losses.append(out.losses.as_floats())
        done, window, corrupt = step + 1, window + 1, corrupt + batch.n_corrupt
        if done % recipe.log_every == 0 or done == cfg.end_step:
            seconds, tick = time.perf_counter() - tick, time.perf_counter()
            corrupt = round(all_ranks_mean(corrupt, rt.device) * rt.world_size)  # a collective
            if metrics is not None:
                metrics.write(
                    {
                        "step": step,
                        **losses[-1],
                        "lr": v.lr,
                        "wd": v.weight_decay,
                        "momentum": v.momentum,
                        "teacher_temp": v.teacher_temp,
                        "entropy": out.entropy,
                        "proto_usage": out.proto_usage,
                        "images_per_s": window * recipe.batch_size * rt.world_size / seconds,
                        # undecodable samples replaced since the last line, all ranks together
                        "corrupt_samples": corrupt,
                    }
                )
            window = corrupt = 0
        if done % recipe.checkpoint_every == 0 or done == cfg.end_step:
            last = _save(cfg, meta, optimizer, done, rt, picture_x, plan)
    pid_file.unlink(missing_ok=True)  # a pid file left behind names a rank that died
    return TrainResult(out=cfg.out, start_step=start, end_step=cfg.end_step, last_checkpoint=last, losses=losses)
