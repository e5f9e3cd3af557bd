"""Prefect artifacts for curation stages: throttled progress, count tables, duplicate pictures.

Artifacts live in the Prefect database, so each one is kept small: progress updates are
throttled, tables hold counts (not rows), and the duplicate gallery embeds a handful of tiny
PNG thumbnails as base64 data URIs in markdown images (the Prefect UI renders those; plain
`<img>` HTML is not guaranteed to survive its markdown sanitiser).
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from lvd.curation.pixels import upright

THUMB_SIDE = 64
MAX_GROUPS = 4
MAX_PER_GROUP = 4  # pictures per group row, representative included


class Progress:
    """A progress artifact updated at most every `min_interval_s` (and always at the end)."""

    def __init__(self, key: str, description: str, min_interval_s: float = 0.5) -> None:
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval_s:
            return
        self._last = now
        update_progress_artifact(artifact_id=self.id, progress=100.0 * done / max(total, 1))


def count_table(key: str, description: str, rows: Iterable[dict]) -> None:
    create_table_artifact(table=list(rows), key=key, description=description)


def status_reason_rows(statuses: Iterable[str], reasons: Iterable[str | None]) -> list[dict]:
    """[{status, reason, count}] sorted by status then reason; reason '(none)' when none
    (the Prefect UI renders cells as markdown: a bare '-' would show as a list bullet)."""
    counts = Counter(zip(statuses, (r or "(none)" for r in reasons)))
    return [{"status": s, "reason": r, "count": n} for (s, r), n in sorted(counts.items())]


def ingest_status_rows(manifests: Iterable[str | Path]) -> list[dict]:
    """`status_reason_rows` of every record of the ingest manifests, counted one partition at a
    time (Arrow's group_by): the flow's process never holds a row per input."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in manifests:
        g = (
            pq.read_table(path, columns=["status", "reason"])
            .group_by(["status", "reason"])
            .aggregate([([], "count_all")])
        )
        for s, r, n in zip(g["status"].to_pylist(), g["reason"].to_pylist(), g["count_all"].to_pylist()):
            counts[(s, r or "(none)")] += n
    return [{"status": s, "reason": r, "count": n} for (s, r), n in sorted(counts.items())]


def thumbnail_png(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """A base64 PNG thumbnail (longest side `side`), or None if the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = upright(im).convert("RGB")  # as ingest saw it (a broken EXIF block: as stored)
            im.thumbnail((side, side))
            buf = io.BytesIO()
            # A 64-colour palette keeps a thumbnail near 3 KB, so a gallery stays ~50 KB.
            im.quantize(colors=64).save(buf, format="PNG", optimize=True)
    except Exception:  # a picture for humans: never fail the stage over it
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def duplicate_gallery_markdown(groups: list[tuple[str, list[tuple[str, str, float]]]], blobs: dict[str, bytes]) -> str:
    """Markdown: one table row per group, representative first, then its duplicates.

    groups: (representative uid, [(duplicate uid, method, distance), ...]).
    blobs: uid -> image bytes for every uid shown.
    """
    lines = [
        "# Near-duplicate groups",
        "",
        "Left: the representative kept; right: inputs dropped as its duplicates (method, Hamming distance).",
        "",
        "| kept | duplicates |",
        "|---|---|",
    ]
    for rep, dups in groups[:MAX_GROUPS]:
        cells = [_img(blobs.get(rep), rep[:8])]
        others = [_img(blobs.get(u), f"{u[:8]} {m} d={d:g}") for u, m, d in dups[: MAX_PER_GROUP - 1]]
        lines.append(f"| {cells[0]} | {' '.join(others)} |")
    if not groups:
        lines.append("| (no near-duplicates found) | |")
    return "\n".join(lines)


def _img(data: bytes | None, label: str) -> str:
    b64 = thumbnail_png(data) if data else None
    if b64 is None:
        return f"`{label}` (no preview)"
    return f"![{label}](data:image/png;base64,{b64})"


def gallery_artifact(key: str, markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key=key, description="duplicate groups, side by side")
