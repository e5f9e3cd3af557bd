"""`lvd curate`, `lvd verify` and `lvd demo` through the real CLI entry point (in-process,
against the session's Prefect harness and local Ray)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from lvd.cli import main as cli
from lvd.curation import ledger as lg
from lvd.curation import testdata


@pytest.fixture
def small_dump(tmp_path):
    folder = tmp_path / "dump"
    testdata.write_photo_jpegs(folder / "big", 5, side=160)
    testdata.write_photo_jpegs(folder / "small", 2, side=80, seed=1)
    bad = testdata.write_bad_inputs(folder / "bad")
    tar = testdata.write_hostile_tar(tmp_path / "hostile.tar")
    return folder, tmp_path / "hostile.tar", bad, tar


def test_help_lists_commands():
    text = cli.build_parser().format_help()
    assert all(name in text for name in ("curate", "verify", "demo", "pipeline"))


def test_curate_then_verify_then_tamper(ray_local, prefect_harness, small_dump, tmp_path, capsys):
    folder, tar, bad, tar_expect = small_dump
    run = tmp_path / "run"
    argv = [
        "curate",
        "--input",
        str(folder),
        "--input",
        str(tar),
        "--out",
        str(run),
        "--partition-size",
        "4",
        "--min-side",
        "100",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "OK: every input is accounted for" in printed and "PREFECT_HOME" in printed

    rows = {r["source"]: r for r in lg.read_ledger(run).to_pylist()}
    n_files = 5 + 2 + len(bad)
    n_tar = len(tar_expect)
    assert len(rows) == n_files + n_tar
    small = [r for s, r in rows.items() if "/small/" in s]
    assert [(r["status"], r["reason"]) for r in small] == [("rejected", "too_small")] * 2  # --min-side
    # big/ holds crops (55-100% of the side, resized) of astronaut, chelsea, coffee, rocket and
    # hubble_deep_field; the tar holds astronaut, rocket and coffee whole: copy detection (on by
    # default, model-free) finds the astronaut and coffee crops (70% and 62% of the photo kept)
    # as copies of the larger tar images; the rocket crop keeps 38% of a mostly blank sky, below
    # the 60% the detector promises, so it may go either way; chelsea and hubble always ship
    big = {s.rsplit("/", 1)[1]: r for s, r in rows.items() if "/big/" in s}
    assert big["photo_00001.jpg"]["status"] == big["photo_00004.jpg"]["status"] == "sharded"
    for name, member in (("photo_00000.jpg", "../escape.jpg"), ("photo_00002.jpg", "sample.jpg")):
        whole = rows[f"{tar}::{member}"]
        assert whole["status"] == "sharded" and big[name]["status"] == "duplicate", (name, big[name])
        assert big[name]["duplicate_of"] == whole["uid"], name
    rocket = big["photo_00003.jpg"]
    assert rocket["status"] == "sharded" or rocket["duplicate_of"] == rows[f"{tar}::/abs/x.jpg"]["uid"]

    assert cli.main(["verify", str(run)]) == 0
    assert "OK" in capsys.readouterr().out
    # an `lvd pipeline --out` folder holds its curated run in run/: verify checks that one
    outer = tmp_path / "pipeline-out"
    shutil.copytree(run, outer / "run")
    (outer / "run.json").write_text(json.dumps({"format": "lvd-run-folder", "version": 1, "kind": "pipeline"}))
    assert cli.main(["verify", str(outer)]) == 0
    printed = capsys.readouterr().out
    assert "`lvd pipeline` folder" in printed and str(outer / "run") in printed and "OK" in printed

    part = lg.ledger_files(run)[0]  # drop one row of one ledger part
    table = pq.read_table(part)
    dropped = table["source"][0].as_py()
    pq.write_table(table.slice(1), part)
    assert cli.main(["verify", str(run)]) == 1
    printed = capsys.readouterr().out
    assert "BROKEN" in printed and "missing from the ledger" in printed and dropped in printed


def test_same_input_twice_is_refused(tmp_path, capsys):
    argv = ["curate", "--input", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "more than once" in capsys.readouterr().err


def test_verify_without_a_run_fails(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert "cannot read run" in capsys.readouterr().out


def test_demo_runs_end_to_end(ray_local, prefect_harness, tmp_path, capsys):
    # The demo's 30 training steps cut to 2: the test checks the plumbing, not the features.
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "2", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "OK: every input is accounted for" in printed
    assert "prefect server start" in printed and str(tmp_path / "demo" / "run") in printed
    assert "k-NN top-1 of the teacher:" in printed and "steps 0..2" in printed
    assert (tmp_path / "demo" / "hf" / "config.json").is_file()
    ledger = lg.read_ledger(tmp_path / "demo" / "run")
    statuses = set(ledger["status"].to_pylist())
    assert statuses == {"sharded", "duplicate", "rejected"}  # no seeds, no target: all kept images ship
