"""The Prefect UI in a real browser: Debian's Chromium (headless) against a live
`prefect server start`, after one small `lvd pipeline` run (fixtures in conftest.py).

Every check reads text the rendered page shows (or, for the duplicate pictures, images the
browser decoded), never the HTML source. Each view is saved as a full-page screenshot under
artifacts/screenshots/ (CI keeps them); the paths are listed at the end of the test run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium phones home and, on a closed network,
# stalls on refused connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RENDER_TIMEOUT_MS = 60_000  # the UI fetches and draws after load; slow on a busy 2-core machine

pytestmark = pytest.mark.browser  # needs Debian's Chromium (scripts/test.sh installs it as root)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    expect.set_options(timeout=RENDER_TIMEOUT_MS)
    # The UI scrolls inside its own panes, so a tall window is what makes "full page" shots whole.
    context = browser.new_context(viewport={"width": 1400, "height": 1400})
    context.set_default_timeout(RENDER_TIMEOUT_MS)
    yield context.new_page()
    context.close()


def _visible(page, *texts: str) -> None:
    for text in texts:
        expect(page.get_by_text(text).first).to_be_visible()


def _open_run(page, run, flow_run_id: str, tab: str | None = None) -> None:
    page.goto(f"{run.server.url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
    if tab:
        _tab(page, tab)


def _tab(page, name: str) -> None:
    # The UI's tabs are <li> items of a role=tablist list (they have no role=tab).
    page.get_by_role("tablist").get_by_text(name, exact=True).click()


def _open_latest_artifact(page, run, key: str) -> None:
    """The artifact's key page lists its versions; its newest version's page shows the data."""
    page.goto(f"{run.server.url}/artifacts/key/{key}", wait_until="networkidle")
    page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.wait_for_load_state("networkidle")


def _table_rows(page) -> list[list[str]]:
    """Visible cell texts of each body row of the artifact's table."""
    expect(page.get_by_role("row").nth(1)).to_be_visible()
    return [row.split() for row in page.get_by_role("row").all_inner_texts()[1:]]


def test_flow_run_page_shows_completed_stages(pipeline_run, page, screenshot):
    run = pipeline_run
    _open_run(page, run, run.flow_run_id)
    _visible(page, run.flow_run_name, "Completed", "pipeline")
    # The flow logs one line per stage; the timeline above them is a canvas (no text).
    _visible(
        page,
        "pipeline [1/4] curate 3 input(s)",
        "pipeline [2/4] pretrain tiny",
        "pipeline [3/4] k-NN top-1:",
        "pipeline [4/4] export the teacher backbone",
        "export: teacher backbone of",
    )
    screenshot(page, "01-pipeline-run-logs")

    _tab(page, "Subflow Runs")
    _visible(page, "2 Flow runs", run.children["curate"]["name"], run.children["pretrain"]["name"])
    for flow in ("curate", "pretrain"):
        expect(page.get_by_text(flow, exact=True).first).to_be_visible()
    # State badges: the run's and one per subflow (a failed subflow would show "Failed").
    expect(page.get_by_text("Completed", exact=True)).to_have_count(3)
    screenshot(page, "02-pipeline-subflow-runs")

    _tab(page, "Artifacts")
    _visible(page, "pipeline-summary", "curate -> pretrain -> k-NN -> export")
    screenshot(page, "03-pipeline-artifacts")


def test_curate_subflow_shows_its_tasks_and_artifacts(pipeline_run, page, screenshot):
    run = pipeline_run
    _open_run(page, run, run.children["curate"]["id"], tab="Task Runs")
    _visible(page, "7 Task runs", "(7 Completed)")
    # task run names are `<task>-<3 hex>`; copy detection runs without an embedder (model-free);
    # the hygiene task reports its stages even when all are off (it says so in the summary)
    for task in ("ingest", "hygiene", "dedup", "copy-features", "copy-detection", "shard", "ledger"):
        expect(page.get_by_text(re.compile(rf"^{task}-[0-9a-f]{{3}}$")).first).to_be_visible()
    screenshot(page, "04-curate-task-runs")

    _tab(page, "Artifacts")
    _visible(
        page,
        "curate-ledger-counts",
        "ledger: inputs per status and reason",
        "curate-dedup-counts",
        "curate-dedup-groups",
        "duplicate groups, side by side",
        "curate-copydetect-counts",
        "curate-copydetect-calibration",
    )
    screenshot(page, "05-curate-artifacts")


def test_counts_table_matches_the_ledger(pipeline_run, page, screenshot):
    from lvd.curation.ledger import verify_run

    run = pipeline_run
    _open_latest_artifact(page, run, "curate-ledger-counts")
    _visible(page, "ledger: inputs per status and reason", "status", "reason", "count")
    rows = _table_rows(page)
    assert all(len(r) == 3 for r in rows), rows  # status, reason ("(none)" if none), count
    counts = {(r[0], r[1]): int(r[2]) for r in rows}
    screenshot(page, "06-counts-table")
    rejected = {reason: n for (status, reason), n in counts.items() if status == "rejected"}
    assert rejected == run.expected_rejections  # every broken input the demo dump planted
    by_status = Counter()
    for (status, _), n in counts.items():
        by_status[status] += n
    assert dict(by_status) == verify_run(run.out / "run").by_status


def test_duplicate_group_pictures_render(pipeline_run, page, screenshot):
    run = pipeline_run
    _open_latest_artifact(page, run, "curate-dedup-groups")
    _visible(page, "Near-duplicate groups", "Left: the representative kept", "kept", "duplicates")
    # Thumbnails are PNG data URIs in markdown images; alt text is `<uid> <method> d=<dist>`.
    dups = page.get_by_role("img", name=re.compile(r"^[0-9a-f]{8} \S+ d=\d+$"))
    kept = page.get_by_role("img", name=re.compile(r"^[0-9a-f]{8}$"))
    expect(dups.first).to_be_visible()
    assert kept.count() >= 2 and dups.count() >= kept.count()  # both photos were reposted
    for img in kept.all() + dups.all():
        expect(img).to_be_visible()
        width = img.evaluate("e => e.complete ? e.naturalWidth : 0")
        assert 0 < width <= 64, "the browser did not decode a thumbnail"
    screenshot(page, "07-duplicate-groups")


def test_pretrain_subflow_shows_loss_table(pipeline_run, page, screenshot):
    run = pipeline_run
    _open_run(page, run, run.children["pretrain"]["id"], tab="Task Runs")
    for task in ("train", "knn-eval"):
        expect(page.get_by_text(re.compile(rf"^{task}-[0-9a-f]{{3}}$")).first).to_be_visible()
    _tab(page, "Artifacts")
    _visible(
        page,
        "pretrain-losses",
        "pretrain: last logged losses and learning rate",
        "pretrain-knn",
        "pretrain-pictures",
        "pretrain-progress",
    )
    screenshot(page, "08-pretrain-artifacts")

    _open_latest_artifact(page, run, "pretrain-losses")
    _visible(page, "pretrain: last logged losses and learning rate", "1 Item")
    header = page.get_by_role("row").first.inner_text().split()
    assert header[:5] == ["step", "loss", "dino_loss", "ibot_loss", "koleo_loss"] and "lr" in header
    (row,) = _table_rows(page)
    metrics = (run.out / "pretrain" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(metrics[-1])  # what training wrote (its step counts from 0)
    assert row[0] == str(last["step"] + 1) == "2"
    assert float(row[1]) == round(last["loss"], 6)
    screenshot(page, "09-loss-table")


def test_pipeline_summary_shows_knn_top1(pipeline_run, page, screenshot):
    run = pipeline_run
    _open_latest_artifact(page, run, "pipeline-summary")
    knn = json.loads(next((run.out / "pretrain" / "checkpoints").glob("step_*/eval_knn.json")).read_text())
    _visible(
        page,
        "Pipeline summary",
        "inputs by status",
        "k-NN top-1",
        f"{100 * knn['top1']:.2f}%",
        "steps 0 -> 2, relaunches 0",
    )
    screenshot(page, "10-pipeline-summary")
