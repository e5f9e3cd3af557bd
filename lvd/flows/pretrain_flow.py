"""The Prefect flow `pretrain`: DINOv2 training on curation shards, reported.

One process (`nproc_per_node=1`): training runs in a worker thread inside one Prefect task
while the task's own thread polls OUT/metrics.jsonl: Prefect artifacts and the run logger
need the task's context, which a plain thread does not have, so the reporting stays on the
task thread. Several ranks (`nproc_per_node=N`): the task starts `lvd pretrain
--nproc-per-node N` as a child process (pretrain_launch.py), polls the same file, and when
a rank dies relaunches it with `--resume` from the latest complete checkpoint, at most
`max_relaunches` times. train() writes a metrics line every `recipe.log_every` steps and at
the last step, so progress moves in those increments.

Reports: a progress artifact (steps done / total), a log line per metrics line, a table of
the last logged losses and learning rates, the k-NN top-1 when labelled folders are given,
the PCA / CLS-attention pictures train() wrote in OUT/pictures, and a markdown summary
(with the number of relaunches).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lvd.flows import artifacts
from lvd.flows.pretrain_launch import RanksCommand, launch_with_relaunches
from lvd.flows.pretrain_report import (
    MetricsFollower,
    loss_table,
    pictures_markdown,
    read_metrics,
    summary_markdown,
)

POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class PretrainSummary:
    """What `pretrain` returns: where the run is, how far it went, how good it is."""

    out: str
    recipe: str
    start_step: int
    end_step: int
    checkpoint: str | None
    last_loss: float | None
    knn_top1: float | None = None
    relaunches: int = 0  # times the ranks were restarted from a checkpoint after a failure


@dataclass(frozen=True)
class TrainOutcome:
    """What the train task hands on: steps run, the last checkpoint, relaunches."""

    start_step: int
    end_step: int
    last_checkpoint: Path | None
    relaunches: int = 0


def _first_step(cfg) -> int:
    """The step a run starts at: that of the checkpoint it resumes from, else 0."""
    from lvd.pretrain import checkpoint as ckpt

    last = ckpt.latest_checkpoint(cfg.out) if cfg.resume else None
    return 0 if last is None else ckpt.read_meta(last).step


@task(name="train", cache_policy=NO_CACHE)  # checkpoints are the cache (resume)
def train_task(cfg) -> TrainOutcome:
    """Run train(cfg) in a thread; report its metrics lines as they appear."""
    from lvd.pretrain.train import train

    follow = MetricsFollower(cfg.out / "metrics.jsonl", cfg.end_step, after_step=_first_step(cfg) - 1)
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as e:  # noqa: BLE001 -- re-raised on the task thread, where Prefect sees it
            outcome["error"] = e

    worker = threading.Thread(target=work, name="lvd-train", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        follow()
    if "error" in outcome:
        raise outcome["error"]
    follow.progress(cfg.end_step, cfg.end_step)
    r = outcome["result"]
    return TrainOutcome(r.start_step, r.end_step, r.last_checkpoint)


@task(name="train-ranks", cache_policy=NO_CACHE)
def train_ranks_task(cfg, spec: RanksCommand, max_relaunches: int) -> TrainOutcome:
    """`lvd pretrain --nproc-per-node N` as a child; relaunched from the latest checkpoint
    when it fails (a rank died), at most `max_relaunches` times."""
    from lvd.pretrain import checkpoint as ckpt
    from lvd.pretrain.train import MetricsLog

    start = _first_step(cfg)
    follow = MetricsFollower(cfg.out / "metrics.jsonl", cfg.end_step, after_step=start - 1)

    def before_relaunch(attempt: int, code: int) -> None:
        last = ckpt.latest_checkpoint(cfg.out)
        step = 0 if last is None else ckpt.read_meta(last).step
        get_run_logger().warning(
            "pretrain: launch %d of %d ranks exited with code %d (a rank died or failed; "
            "log %s); relaunching with --resume from %s",
            attempt,
            spec.nproc_per_node,
            code,
            cfg.out / f"launch-{attempt}.log",
            last if last is not None else "the start (no complete checkpoint yet)",
        )
        # steps after the checkpoint are trained again: forget the lines the dead run wrote
        MetricsLog(cfg.out / "metrics.jsonl", resume_step=step)
        follow.after_step = step - 1

    outcome = launch_with_relaunches(
        spec, resume=cfg.resume, max_relaunches=max_relaunches, on_poll=follow, before_relaunch=before_relaunch
    )
    follow.progress(cfg.end_step, cfg.end_step)
    return TrainOutcome(start, cfg.end_step, ckpt.latest_checkpoint(cfg.out), relaunches=outcome.relaunches)


@task(name="knn-eval", cache_policy=NO_CACHE)
def knn_task(checkpoint: Path, train_dir: str, val_dir: str, k: int, device: str | None):
    """k-NN top-1 of the teacher on labelled folders; also written to CKPT/eval_knn.json."""
    import torch

    from lvd.pretrain.checkpoint import load_teacher_backbone
    from lvd.pretrain.knn import evaluate_knn

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher_backbone(checkpoint).to(device)
    result = evaluate_knn(backbone, train_dir, val_dir, size=backbone.config.img_size, k=k, device=device)
    (checkpoint / "eval_knn.json").write_text(result.to_json() + "\n")
    get_run_logger().info(
        "k-NN top-1 %.2f%% (k=%d, %d train / %d val)", 100 * result.top1, result.k, result.n_train, result.n_val
    )
    artifacts.count_table(
        "pretrain-knn",
        "k-NN top-1 of the teacher CLS token",
        [
            {
                "top1_percent": round(100 * result.top1, 2),
                "k": result.k,
                "n_train": result.n_train,
                "n_val": result.n_val,
            }
        ],
    )
    return result


def _check_resume_world_size(cfg, nproc_per_node: int) -> None:
    """Refuse a resume on a number of ranks its data plan cannot be mapped to before starting
    any (train() would too)."""
    from lvd.pretrain import checkpoint as ckpt
    from lvd.pretrain.failures import check_world_size

    last = ckpt.latest_checkpoint(cfg.out) if cfg.resume else None
    if last is not None:
        check_world_size(last, ckpt.read_meta(last), nproc_per_node)


@flow(name="pretrain")
def pretrain(
    shards: list[str],
    out: str,
    recipe: str = "tiny",
    max_steps: int | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    device: str | None = None,
    resume: bool = False,
    knn_train: str | None = None,
    knn_val: str | None = None,
    knn_k: int = 20,
    nproc_per_node: int = 1,
    max_relaunches: int = 2,
    deterministic: bool = False,
    config: str | None = None,
    sets: list[str] | None = None,
    init: str | None = None,
    distill_from: str | None = None,
) -> PretrainSummary:
    """Train recipe `recipe` on `shards` into `out`; k-NN on knn_train/knn_val when given.

    nproc_per_node > 1 trains that many FSDP2 ranks in a child process, relaunched from the
    latest checkpoint up to `max_relaunches` times when a rank dies (batch_size per rank).
    `config`, `sets`, `init` and `distill_from` are `lvd pretrain`'s --config, --set (a list),
    --init and --distill-from; the recipe is resolved once, as the command line does."""
    from lvd.pretrain.data import expand_shards
    from lvd.pretrain.failures import check_shard_files
    from lvd.pretrain.overrides import resolve_recipe
    from lvd.pretrain.train import TrainConfig

    if (knn_train is None) != (knn_val is None):
        raise ValueError("k-NN evaluation needs both a labelled train folder and a val folder")
    if nproc_per_node < 1 or max_relaunches < 0:
        raise ValueError(
            f"nproc_per_node {nproc_per_node} / max_relaunches {max_relaunches}: "
            "use at least 1 rank and 0 or more relaunches"
        )
    r = resolve_recipe(recipe, config=config, sets=sets or (), batch_size=batch_size, distill_from=distill_from)
    cfg = TrainConfig(
        shards=tuple(expand_shards(shards)),
        recipe=r,
        out=Path(out).resolve(),
        max_steps=max_steps,
        resume=resume,
        num_workers=num_workers,
        seed=seed,
        device=device,
        deterministic=deterministic,
        init=init,
    )
    get_run_logger().info(
        "pretrain: recipe %s, %d shards, %d rank(s), steps to %d -> %s",
        r.name,
        len(cfg.shards),
        nproc_per_node,
        cfg.end_step,
        cfg.out,
    )
    if nproc_per_node == 1:
        result = train_task(cfg)
    else:  # what train() checks first, checked once before any process is started
        check_shard_files(cfg.shards)
        _check_resume_world_size(cfg, nproc_per_node)
        spec = RanksCommand(
            shards=tuple(shards),
            recipe=recipe,
            out=cfg.out,
            nproc_per_node=nproc_per_node,
            max_steps=max_steps,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            device=device,
            deterministic=deterministic,
            config=config,
            sets=tuple(sets or ()),
            init=init,
            distill_from=distill_from,
        )
        result = train_ranks_task(cfg, spec, max_relaunches)
    rows = read_metrics(cfg.out / "metrics.jsonl")
    loss_table(rows)
    knn = None
    if knn_train is not None and result.last_checkpoint is not None:
        knn = knn_task(result.last_checkpoint, knn_train, knn_val, knn_k, device).top1
    if (md := pictures_markdown(cfg.out / "pictures")) is not None:
        create_markdown_artifact(
            markdown=md, key="pretrain-pictures", description="patch PCA and CLS attention of the teacher"
        )
    summary = PretrainSummary(
        out=str(cfg.out),
        recipe=r.name,
        start_step=result.start_step,
        end_step=result.end_step,
        checkpoint=None if result.last_checkpoint is None else str(result.last_checkpoint),
        last_loss=rows[-1]["loss"] if rows else None,
        knn_top1=knn,
        relaunches=result.relaunches,
    )
    create_markdown_artifact(
        markdown=summary_markdown(summary), key="pretrain-summary", description="pretraining summary"
    )
    return summary
