"""What the `pretrain` flow reports from a run folder: metrics lines as they appear (a log
line and the progress artifact), the table of last losses, the pictures, the summary.

train() writes OUT/metrics.jsonl (rank 0, a line every `recipe.log_every` steps and at the
last step) and OUT/pictures/step_NNNNNNN.png; these functions only read them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect import get_run_logger

from lvd.flows import artifacts

TABLE_ROWS = 10
MAX_PICTURES = 2  # newest first; each about 20-60 KB as base64 for the tiny recipe


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


class MetricsFollower:
    """Reports metrics lines of steps after the last one reported (a log line, progress)."""

    def __init__(self, path: Path, total: int, *, after_step: int) -> None:
        self.path, self.total, self.after_step = path, total, after_step
        self.progress = artifacts.Progress("pretrain-progress", f"pretrain: steps done of {total}")

    def __call__(self) -> None:
        log = get_run_logger()
        for r in read_metrics(self.path):
            if r["step"] <= self.after_step:
                continue
            log.info(
                "pretrain: step %d/%d loss %.4f lr %.2e (%.1f img/s)",
                r["step"] + 1,
                self.total,
                r["loss"],
                r["lr"],
                r.get("images_per_s", float("nan")),
            )
            self.progress(r["step"] + 1, self.total)
            self.after_step = r["step"]


def loss_table(rows: list[dict]) -> None:
    keys = ["step", "loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "entropy", "proto_usage"]
    table = [
        {k: (r["step"] + 1 if k == "step" else round(r[k], 6)) for k in keys if k in r} for r in rows[-TABLE_ROWS:]
    ]
    artifacts.count_table("pretrain-losses", "pretrain: last logged losses and learning rate", table)


def pictures_markdown(folder: Path) -> str | None:
    """The newest pictures train() wrote (rows: image | patch PCA | CLS attention)."""
    pngs = sorted(folder.glob("step_*.png"))[-MAX_PICTURES:][::-1]
    if not pngs:
        return None
    lines = [
        "# Teacher features",
        "",
        (
            "Each row: a training crop, the first 3 PCA components of its patch features "
            "as RGB, and the CLS token's attention over patches (last block)."
        ),
        "",
    ]
    for p in pngs:
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        lines += [f"## {p.stem}", "", f"![{p.stem}](data:image/png;base64,{b64})", ""]
    return "\n".join(lines)


def summary_markdown(s) -> str:
    knn = "not run (no labelled folders)" if s.knn_top1 is None else f"{100 * s.knn_top1:.2f}%"
    loss = "none logged" if s.last_loss is None else f"{s.last_loss:.4f}"
    return "\n".join(
        [
            "# Pretraining summary",
            "",
            "| | |",
            "|---|---|",
            f"| recipe | `{s.recipe}` |",
            f"| steps | {s.start_step} -> {s.end_step} |",
            f"| last loss | {loss} |",
            f"| k-NN top-1 | {knn} |",
            f"| relaunches | {s.relaunches} |",
            f"| checkpoint | `{s.checkpoint}` |",
            f"| output | `{s.out}` |",
        ]
    )
