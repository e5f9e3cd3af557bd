"""Small pictures of part-2 stages for Prefect markdown artifacts (PNG as base64, like
`artifacts.py`): images per cluster, a seed beside what it retrieved, cluster-size histograms.

Each artifact holds a few 64-px palette thumbnails (~3 KB each) or one small bar chart drawn
with Pillow, so it stays well under 100 KB in the Prefect database.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from lvd.flows.artifacts import _img

MAX_ROWS = 6
PER_ROW = 5


def cluster_montage_markdown(members: dict[int, list[str]], blobs: dict[str, bytes]) -> str:
    """One row per cluster (largest first): its size and a few member thumbnails."""
    lines = ["# Clusters", "", "| cluster (size) | members |", "|---|---|"]
    shown = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_ROWS]
    for c, uids in shown:
        lines.append(f"| {c} ({len(uids)}) | {' '.join(_img(blobs.get(u), u[:8]) for u in uids[:PER_ROW])} |")
    if not shown:
        lines.append("| (no clusters) | |")
    return "\n".join(lines)


def retrieval_markdown(pairs: dict[str, list[tuple[str, float]]], blobs: dict[str, bytes]) -> str:
    """One row per seed: the seed, then the pool images it retrieved (cosine)."""
    lines = ["# Retrieval", "", "| seed | retrieved (cosine) |", "|---|---|"]
    for seed, got in list(pairs.items())[:MAX_ROWS]:
        cells = " ".join(_img(blobs.get(u), f"{u[:8]} {s:.3f}") for u, s in got[:PER_ROW])
        lines.append(f"| {_img(blobs.get(seed), seed[:8])} | {cells} |")
    if not pairs:
        lines.append("| (no seed retrieved anything) | |")
    return "\n".join(lines)


def histogram_png(before: np.ndarray, after: np.ndarray, width: int = 320, height: int = 120) -> str:
    """Base64 PNG: cluster sizes sorted descending, before (grey) and after (blue) selection."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    order = np.argsort(-np.asarray(before), kind="stable")
    top = max(1, int(np.max(before)) if len(before) else 1)
    n = max(1, len(order))
    bar = width / n
    for i, c in enumerate(order):
        for values, colour in ((before, (170, 170, 170)), (after, (40, 90, 200))):
            h = (height - 4) * float(values[c]) / top
            draw.rectangle([i * bar, height - h, (i + 1) * bar - 1, height], fill=colour)
    buf = io.BytesIO()
    img.quantize(colors=8).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_markdown(before: np.ndarray, after: np.ndarray) -> str:
    return "\n".join([
        "# Cluster sizes", "",
        f"Grey: candidates per cluster ({int(np.sum(before))}); blue: selected ({int(np.sum(after))}), largest cluster first.",
        "", f"![cluster sizes](data:image/png;base64,{histogram_png(before, after)})",
    ])
