"""Run-folder ownership (lvd.runfolder): a run folder records its inputs and settings and is
locked while a run works in it.

Real everything: `lvd curate` through `lvd.cli.main.main` against the session's Prefect
harness and local Ray; the concurrent run is a real `lvd curate` subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lvd import runfolder
from lvd.cli import main as cli
from lvd.curation import ledger as lg
from lvd.curation import testdata
from lvd.curation.ledger import verify_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dumps(tmp_path):
    a, b = tmp_path / "dump-a", tmp_path / "dump-b"
    testdata.write_photo_jpegs(a, 6, side=96, seed=1)
    testdata.write_photo_jpegs(b, 5, side=96, seed=2)
    return a, b


def curate(*argv) -> list[str]:
    return ["curate", *map(str, argv), "--partition-size", "4", "--no-copy-detection"]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file with size and mtime, but the lock (it names its latest holder)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def sources(run: Path) -> set[str]:
    return set(lg.read_ledger(run, ["source"])["source"].to_pylist())


def no_flow(monkeypatch) -> list[str]:
    """Records any start of the curate or pipeline flow: a refusal before Prefect and Ray start
    records none (this checks that, where a time limit depended on the machine's load)."""
    import lvd.flows.curate
    import lvd.flows.pipeline

    started: list[str] = []

    def record(name):
        def flow(*args, **kwargs):
            started.append(name)
            raise RuntimeError(f"the {name} flow started")

        return flow

    monkeypatch.setattr(lvd.flows.curate, "curate", record("curate"))
    monkeypatch.setattr(lvd.flows.pipeline, "pipeline", record("pipeline"))
    return started


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_other_inputs_or_settings_refused_and_folder_unchanged(
    ray_local, prefect_harness, dumps, tmp_path, capsys, monkeypatch
):
    a, b = dumps
    run = tmp_path / "run"
    assert cli.main(curate("--input", a, "--out", run)) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["inputs"] == [str(a.resolve())] and record["settings"]["partition_size"] == 4
    before = listing(run)
    capsys.readouterr()

    with monkeypatch.context() as m:
        started = no_flow(m)
        assert cli.main(curate("--input", b, "--out", run)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: ") and "other inputs" in line and str(b) in line and str(a) in line
    assert "--extend" in line and "--overwrite" in line
    assert started == []  # refused before Prefect and Ray

    assert cli.main(curate("--input", a, "--out", run, "--min-side", "50")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "other settings" in line and "ingest.min_side 32 -> 50" in line
    assert listing(run) == before  # nothing written, nothing deleted
    assert sources(run) and all(s.startswith(str(a)) for s in sources(run))

    # the flow refuses too (a caller that does not come through the command line)
    from lvd.flows.curate import curate as flow

    with pytest.raises(runfolder.RunFolderError, match="other inputs"):
        flow(inputs=[str(b)], out=str(run), partition_size=4, copy_detection=False)
    runfolder.release_all()
    assert listing(run) == before

    assert cli.main(curate("--input", a, "--out", run)) == 0  # the same command resumes
    assert verify_run(run).ok


def test_extend_adds_inputs_and_the_ledger_holds_both(ray_local, prefect_harness, dumps, tmp_path, capsys):
    a, b = dumps
    run = tmp_path / "run"
    assert cli.main(curate("--input", a, "--out", run)) == 0
    first = sources(run)
    assert cli.main(curate("--input", b, "--out", run, "--extend")) == 0
    both = sources(run)
    assert first < both and {s for s in both - first if s.startswith(str(b))} == both - first
    assert len(both) == 11
    report = verify_run(run)
    assert report.ok and report.inputs == 11, report.problems
    record = json.loads((run / "run.json").read_text())
    assert record["inputs"] == [str(a.resolve()), str(b.resolve())]
    assert [h["action"] for h in record["history"]] == ["created", "extended"]
    capsys.readouterr()
    # the extended run resumes with both inputs, in any order; a settings change is still refused
    assert cli.main(curate("--input", b, "--input", a, "--out", run)) == 0
    assert cli.main(curate("--input", b, "--out", run, "--extend", "--shard-size", "3")) == 2
    assert "other settings" in capsys.readouterr().err
    # an earlier input that is gone cannot be extended
    a.rename(tmp_path / "moved")
    assert cli.main(curate("--input", b, "--out", run, "--extend")) == 2
    assert "no longer exist" in capsys.readouterr().err and str(a.resolve()) in run.joinpath("run.json").read_text()


def test_overwrite_replaces_the_run(ray_local, prefect_harness, dumps, tmp_path):
    a, b = dumps
    testdata.write_photo_jpegs(a / "more", 4, side=96, seed=3)  # 3 partitions of 4 here, 2 in b
    run = tmp_path / "run"
    assert cli.main(curate("--input", a, "--out", run)) == 0
    assert (run / "ingest" / "part-000002.parquet").exists()
    assert cli.main(curate("--input", b, "--out", run, "--overwrite", "--min-side", "50")) == 0
    assert not (run / "ingest" / "part-000002.parquet").exists()  # the first run's third part is gone
    assert sources(run) and all(s.startswith(str(b)) for s in sources(run))
    blobs = pq.read_table(sorted((run / "ingest").glob("*.parquet"))[0])
    assert blobs.num_rows
    ingested = {
        s
        for p in (run / "ingest").glob("part-*[0-9].parquet")
        for s in pq.read_table(p, columns=["source"])["source"].to_pylist()
    }
    assert ingested == sources(run)  # no part of the first run is left behind
    assert verify_run(run).ok
    record = json.loads((run / "run.json").read_text())
    assert record["inputs"] == [str(b.resolve())] and record["settings"]["ingest"]["min_side"] == 50


def test_overwrite_never_wipes_a_folder_that_is_not_a_run(tmp_path, dumps, capsys):
    a, _ = dumps
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    assert cli.main(curate("--input", a, "--out", home, "--overwrite")) == 2
    assert "not an lvd run folder" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "precious"


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_second_concurrent_run_is_refused(ray_local, prefect_harness, tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    dump = tmp_path / "dump"
    testdata.write_photo_jpegs(dump, 160, side=128)
    run = tmp_path / "run"
    argv = curate("--input", dump, "--out", run)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    address = ray_local.get_runtime_context().gcs_address
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "lvd.cli", *argv, "--ray-address", address],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 240
        while first.poll() is None and not _locked(run / ".lock") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert _locked(run / ".lock")
        capsys.readouterr()
        with monkeypatch.context() as m:
            started = no_flow(m)
            assert cli.main(argv) == 1  # the same command, while the first works
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"error: another lvd run (pid {first.pid}, started ") and line.endswith(f"holds {run}")
        assert started == []  # refused before Prefect and Ray
        assert first.poll() is None  # still running: the refusal came while it held the folder
    finally:
        rc = first.wait(timeout=300)
    assert rc == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert not _locked(run / ".lock")
    assert cli.main(argv) == 0  # once it is done the same command resumes


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = (
        "import sys, time; from lvd import runfolder; "
        "runfolder.claim(sys.argv[1], [sys.argv[1]], {}); print('held', flush=True); time.sleep(60)"
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout.readline().strip() == b"held"
        with pytest.raises(runfolder.RunFolderBusy, match=f"pid {proc.pid}, started"):
            runfolder.claim(run, [str(run)], {})
    finally:
        proc.kill()
        proc.wait()
    with runfolder.claim(run, [str(run)], {}) as c:  # the OS released it with the process
        assert c.action == "resumed"
    assert runfolder.held() == []


def test_pipeline_out_of_another_run_refused_and_overwrite_keeps_foreign_files(tmp_path, dumps, capsys, monkeypatch):
    """`lvd pipeline` records OUT like a curate run (refused before Prefect starts); its
    --overwrite deletes only the pipeline's outputs (the demo keeps its dump and k-NN folders)."""
    from lvd.cli import pipeline as command

    a, b = dumps
    out = tmp_path / "p"
    params = command._params(cli.build_parser().parse_args(["pipeline", "--input", str(a), "--out", str(out)]))
    with runfolder.claim(out, params["inputs"], runfolder.pipeline_settings(params), kind="pipeline"):
        pass  # as the flow leaves it
    with monkeypatch.context() as m:
        started = no_flow(m)
        assert cli.main(["pipeline", "--input", str(b), "--out", str(out)]) == 2
    assert started == []  # before Prefect and Ray (the flow would refuse too, later)
    assert "other inputs" in capsys.readouterr().err
    assert cli.main(["pipeline", "--input", str(a), "--out", str(out), "--recipe", "vits14"]) == 2
    assert 'recipe "tiny" -> "vits14"' in capsys.readouterr().err

    for name in ("run", "pretrain", "hf", "dump", "knn"):
        (out / name).mkdir()
        (out / name / "f").write_text(name)
    with runfolder.claim(out, [str(b)], {}, "overwrite", outputs=runfolder.PIPELINE_OUTPUTS) as c:
        assert c.action == "overwritten"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "dump", "knn", "run.json"]


def test_settings_of_a_short_call_and_of_the_command_line_agree():
    """The command line spells out every option; a Python call passes few: same settings."""
    import inspect

    from lvd.cli.options import curate_kwargs
    from lvd.flows.curate import curate as flow

    defaults = {
        k: p.default
        for k, p in inspect.signature(flow.fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert runfolder.curate_settings({}) == runfolder.curate_settings(defaults)
    args = cli.build_parser().parse_args(["curate", "--input", "x", "--out", "y"])
    assert runfolder.curate_settings(curate_kwargs(args)) == runfolder.curate_settings({})
    args = cli.build_parser().parse_args(["curate", "--input", "x", "--out", "y", "--min-side", "50"])
    assert runfolder.curate_settings(curate_kwargs(args)) != runfolder.curate_settings({})
