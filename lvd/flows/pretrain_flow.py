"""The Prefect flow `pretrain`: single-process DINOv2 training on curation shards, reported.

Training runs in a worker thread inside one Prefect task while the task's own thread polls
OUT/metrics.jsonl: Prefect artifacts and the run logger need the task's context, which a
plain thread does not have, so the reporting stays on the task thread. train() writes a
metrics line every `recipe.log_every` steps and at the last step, so progress moves in
those increments.

Reports: a progress artifact (steps done / total), a log line per metrics line, a table of
the last logged losses and learning rates, the k-NN top-1 when labelled folders are given,
the PCA / CLS-attention pictures train() wrote in OUT/pictures, and a markdown summary.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lvd.flows import artifacts

POLL_S = 1.0
TABLE_ROWS = 10
MAX_PICTURES = 2  # newest first; each about 20-60 KB as base64 for the tiny recipe


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


def read_metrics(path: Path) -> list[dict]:
    """The complete JSON lines of metrics.jsonl (a line being written is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # train() is mid-write: read it next poll
            break
    return rows


def _report_new_lines(rows: list[dict], seen: int, total: int, progress: artifacts.Progress) -> int:
    log = get_run_logger()
    for r in rows[seen:]:
        log.info("pretrain: step %d/%d loss %.4f lr %.2e (%.1f img/s)",
                 r["step"] + 1, total, r["loss"], r["lr"], r.get("images_per_s", float("nan")))
        progress(r["step"] + 1, total)
    return max(seen, len(rows))


@task(name="train", cache_policy=NO_CACHE)  # checkpoints are the cache (resume)
def train_task(cfg):
    """Run train(cfg) in a thread; report its metrics lines as they appear."""
    from lvd.pretrain.train import train

    total = cfg.end_step
    progress = artifacts.Progress("pretrain-progress", f"pretrain: steps done of {total}")
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as e:  # noqa: BLE001 -- re-raised on the task thread, where Prefect sees it
            outcome["error"] = e

    worker = threading.Thread(target=work, name="lvd-train", daemon=True)
    metrics = cfg.out / "metrics.jsonl"
    # A resumed run keeps earlier lines: report only lines written from now on.
    seen = len(read_metrics(metrics)) if cfg.resume else 0
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        seen = _report_new_lines(read_metrics(metrics), seen, total, progress)
    if "error" in outcome:
        raise outcome["error"]
    progress(total, total)
    return outcome["result"]


def _loss_table(rows: list[dict]) -> None:
    keys = ["step", "loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "entropy", "proto_usage"]
    table = [{k: (r["step"] + 1 if k == "step" else round(r[k], 6)) for k in keys if k in r}
             for r in rows[-TABLE_ROWS:]]
    artifacts.count_table("pretrain-losses", "pretrain: last logged losses and learning rate", table)


@task(name="knn-eval", cache_policy=NO_CACHE)
def knn_task(checkpoint: Path, train_dir: str, val_dir: str, k: int, device: str | None):
    """k-NN top-1 of the teacher on labelled folders; also written to CKPT/eval_knn.json."""
    import torch

    from lvd.pretrain.checkpoint import load_teacher_backbone
    from lvd.pretrain.knn import evaluate_knn

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_teacher_backbone(checkpoint).to(device)
    result = evaluate_knn(backbone, train_dir, val_dir, size=backbone.config.img_size, k=k,
                          device=device)
    (checkpoint / "eval_knn.json").write_text(result.to_json() + "\n")
    get_run_logger().info("k-NN top-1 %.2f%% (k=%d, %d train / %d val)", 100 * result.top1,
                          result.k, result.n_train, result.n_val)
    artifacts.count_table("pretrain-knn", "k-NN top-1 of the teacher CLS token", [
        {"top1_percent": round(100 * result.top1, 2), "k": result.k,
         "n_train": result.n_train, "n_val": result.n_val}])
    return result


def pictures_markdown(folder: Path) -> str | None:
    """The newest pictures train() wrote (rows: image | patch PCA | CLS attention)."""
    pngs = sorted(folder.glob("step_*.png"))[-MAX_PICTURES:][::-1]
    if not pngs:
        return None
    lines = ["# Teacher features", "",
             ("Each row: a training crop, the first 3 PCA components of its patch features "
              "as RGB, and the CLS token's attention over patches (last block)."), ""]
    for p in pngs:
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        lines += [f"## {p.stem}", "", f"![{p.stem}](data:image/png;base64,{b64})", ""]
    return "\n".join(lines)


def _summary_markdown(s: PretrainSummary) -> str:
    knn = "not run (no labelled folders)" if s.knn_top1 is None else f"{100 * s.knn_top1:.2f}%"
    loss = "-" if s.last_loss is None else f"{s.last_loss:.4f}"
    return "\n".join([
        "# Pretraining summary", "",
        "| | |", "|---|---|",
        f"| recipe | `{s.recipe}` |", f"| steps | {s.start_step} -> {s.end_step} |",
        f"| last loss | {loss} |", f"| k-NN top-1 | {knn} |",
        f"| checkpoint | `{s.checkpoint}` |", f"| output | `{s.out}` |",
    ])


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
) -> PretrainSummary:
    """Train recipe `recipe` on `shards` into `out`; k-NN on knn_train/knn_val when given."""
    from lvd.pretrain.data import expand_shards
    from lvd.pretrain.recipes import get_recipe
    from lvd.pretrain.train import TrainConfig

    if (knn_train is None) != (knn_val is None):
        raise ValueError("k-NN evaluation needs both a labelled train folder and a val folder")
    r = get_recipe(recipe)
    if batch_size is not None:
        r = replace(r, batch_size=batch_size)
    cfg = TrainConfig(shards=tuple(expand_shards(shards)), recipe=r, out=Path(out).resolve(),
                      max_steps=max_steps, resume=resume, num_workers=num_workers, seed=seed,
                      device=device)
    get_run_logger().info("pretrain: recipe %s, %d shards, steps to %d -> %s",
                          r.name, len(cfg.shards), cfg.end_step, cfg.out)
    result = train_task(cfg)
    rows = read_metrics(cfg.out / "metrics.jsonl")
    _loss_table(rows)
    knn = None
    if knn_train is not None and result.last_checkpoint is not None:
        knn = knn_task(result.last_checkpoint, knn_train, knn_val, knn_k, device).top1
    if (md := pictures_markdown(cfg.out / "pictures")) is not None:
        create_markdown_artifact(markdown=md, key="pretrain-pictures",
                                 description="patch PCA and CLS attention of the teacher")
    summary = PretrainSummary(
        out=str(cfg.out), recipe=r.name, start_step=result.start_step, end_step=result.end_step,
        checkpoint=None if result.last_checkpoint is None else str(result.last_checkpoint),
        last_loss=rows[-1]["loss"] if rows else None, knn_top1=knn,
    )
    create_markdown_artifact(markdown=_summary_markdown(summary), key="pretrain-summary",
                             description="pretraining summary")
    return summary
