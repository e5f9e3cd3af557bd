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


def cluster_montage_markdown(members: dict[int, list[str]], sizes: dict[int, int], blobs: dict[str, bytes]) -> str:
    """One row per cluster (largest first): its size and a few of its members' thumbnails
    (`members`: the ones shown, `curate_tasks.largest_clusters`)."""
    lines = ["# Clusters", "", "| cluster (size) | members |", "|---|---|"]
    shown = sorted(members.items(), key=lambda kv: (-sizes[kv[0]], kv[0]))[:MAX_ROWS]
    for c, uids in shown:
        lines.append(f"| {c} ({sizes[c]}) | {' '.join(_img(blobs.get(u), u[:8]) for u in uids[:PER_ROW])} |")
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
    return "\n".join(
        [
            "# Cluster sizes",
            "",
            f"Grey: candidates per cluster ({int(np.sum(before))}); blue: selected ({int(np.sum(after))}), largest cluster first.",
            "",
            f"![cluster sizes](data:image/png;base64,{histogram_png(before, after)})",
        ]
    )


def score_histogram_png(
    copy: list[float], distinct: list[float], threshold: float, width: int = 400, height: int = 160
) -> str:
    """Base64 PNG: histograms of known-copy scores (blue, up) and distinct-pair scores (grey,
    down), each scaled to its own tallest bin, on one axis from the smallest score to the 95th
    percentile of the copies (at least twice the threshold), the threshold as a red line."""
    copy_a, dist_a = np.asarray(copy, np.float64), np.asarray(distinct, np.float64)
    both = np.concatenate([copy_a, dist_a, [threshold]])
    lo = float(both.min())
    hi = max(float(np.percentile(copy_a, 95)) if len(copy_a) else lo + 1.0, 2 * threshold - lo, lo + 1e-6)
    bins = 40
    edges = np.linspace(lo, hi, bins + 1)
    hc, _ = np.histogram(np.clip(copy_a, lo, hi), edges)
    hd, _ = np.histogram(np.clip(dist_a, lo, hi), edges)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    mid, margin = height // 2, 14
    bar = width / bins
    for i in range(bins):
        up = (mid - margin) * hc[i] / max(1, hc.max(initial=0))
        down = (mid - margin) * hd[i] / max(1, hd.max(initial=0))
        draw.rectangle([i * bar, mid - up, (i + 1) * bar - 1, mid], fill=(40, 90, 200))
        draw.rectangle([i * bar, mid, (i + 1) * bar - 1, mid + down], fill=(150, 150, 150))
    x = (threshold - lo) / (hi - lo) * width
    draw.line([x, 0, x, height], fill=(220, 30, 30), width=2)
    draw.text((2, 1), f"known copies ({len(copy_a)})", fill=(40, 90, 200))
    draw.text((2, height - 12), f"distinct pairs ({len(dist_a)})", fill=(90, 90, 90))
    draw.text((min(x + 3, width - 90), mid - 12), f"threshold {threshold:g}", fill=(220, 30, 30))
    draw.text((width - 70, height - 12), f"{lo:g} .. {hi:.3g}", fill=(90, 90, 90))
    buf = io.BytesIO()
    img.quantize(colors=8).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def calibration_markdown(cal: dict) -> str:
    """The copy threshold, how it was chosen, recall per kind, false links, and the histogram."""
    copy = [s for v in cal["copy_scores"].values() for s in v]
    unit = "RANSAC inliers spanning the image" if cal["method"] == "copy" else "cosine of the copy model"
    rows = [f"| {k} | {100 * r:.1f}% |" for k, r in sorted(cal["recall"].items())]
    return "\n".join(
        [
            "# Copy threshold",
            "",
            f"Score: {unit}. Threshold **{cal['threshold']:g}** ({cal['source']}), target false-link rate "
            f"{100 * cal['false_link_rate']:.2f}%.",
            "",
            f"Known copies of {cal['images']} pool images: recall **{100 * cal['copy_recall']:.1f}%**; "
            f"distinct pairs (top and bottom halves, diagonal quadrants and top and bottom thirds of those images) linked: "
            f"**{cal['false_links']} of {cal['distinct_pairs']}**.",
            "",
            "Blue (up): known copies; grey (down): distinct pairs (each scaled to its tallest bar; scores "
            "above the axis end are in its last bar); red: the threshold.",
            "",
            f"![score histogram](data:image/png;base64,{score_histogram_png(copy, cal['distinct_scores'], cal['threshold'])})",
            "",
            "| copy kind | recall |",
            "|---|---|",
            *rows,
        ]
    )


def weakest_links_markdown(links: list[tuple[str, str, str, float]], blobs: dict[str, bytes], threshold: float) -> str:
    """One row per decided copy link with the least evidence (`stages.copy.weakest_links`):
    its score, the image and the one it was linked to. Distinct look-alikes show here first. A
    score below the threshold is a pair whose hash groups were joined by a decided link between
    other versions (chain splitting's units): said so on the row."""
    lines = [
        "# Copy detection: the weakest links",
        "",
        f"The decided links with the least evidence (threshold {threshold:g}). If two of these are "
        "different objects, raise `--copy-threshold` above their score, or decide with `--copy-model`.",
        "",
        "| score | image | linked to |",
        "|---|---|---|",
    ]
    for uid, other, method, score in links[:MAX_ROWS]:
        shown = f"{score:g} inliers" if method == "copy" else f"cosine {score:.3f}"
        if (score < threshold) if method == "copy" else (score <= threshold):
            # chain splitting joined their hash groups: the decided link is with a version of one
            shown += " (linked through a hash duplicate of one of them)"
        lines.append(f"| {shown} | {_img(blobs.get(uid), uid[:8])} | {_img(blobs.get(other), other[:8])} |")
    if not links:
        lines.append("| (no link decided by the copy detector) | | |")
    return "\n".join(lines)


def components_markdown(title: str, groups: list[list[str]], blobs: dict[str, bytes]) -> str:
    """One row per component (largest first): a few of its images."""
    lines = [f"# {title}", "", "| component | images |", "|---|---|"]
    for i, uids in enumerate(groups[:MAX_ROWS]):
        lines.append(f"| {i + 1} ({len(uids)} shown) | {' '.join(_img(blobs.get(u), u[:8]) for u in uids[:PER_ROW])} |")
    if not groups:
        lines.append("| (none) | |")
    return "\n".join(lines)


def hygiene_markdown(
    rejected: dict[str, list[tuple[str, str, bytes | None]]], blurred: list[tuple[str, int, bytes | None]]
) -> str:
    """Rejected examples per hygiene reason (label: the rule or value), then images whose faces
    were blurred, shown as the shards store them (blurred)."""
    lines = ["# Pool hygiene", "", "| reason | examples (rule or measured value) |", "|---|---|"]
    for reason, shown in sorted(rejected.items()):
        lines.append(f"| {reason} | {' '.join(_img(data, label) for _, label, data in shown[:PER_ROW])} |")
    if not rejected:
        lines.append("| (nothing rejected by a hygiene filter) | |")
    lines += ["", "| faces blurred | as stored in the shards |", "|---|---|"]
    cells = " ".join(
        _img(data, f"{source.rsplit('/', 1)[-1][:24]}: {n} face(s)") for source, n, data in blurred[:PER_ROW]
    )
    lines.append(f"| {len(blurred)} shown | {cells or '(no faces found, or face blurring off)'} |")
    return "\n".join(lines)
