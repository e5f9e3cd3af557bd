"""The `pipeline` flow (curate -> pretrain -> k-NN -> export) on a small real-photo dump,
against the session's Prefect harness and local Ray; and its parameter checks."""

from __future__ import annotations

import json

import pytest
import torch
from prefect_runs import run_artifacts

from lvd.cli import main as cli
from lvd.curation import testdata
from lvd.curation.demo import build_knn_folders
from lvd.curation.ledger import verify_run
from lvd.flows.pretrain_flow import pictures_markdown, read_metrics


@pytest.fixture(scope="module")
def pipeline_run(ray_local, prefect_harness, tmp_path_factory):
    from lvd.flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    testdata.write_photo_jpegs(root / "dump" / "photos", 6, side=96)
    testdata.write_bad_inputs(root / "dump" / "bad")
    train, val = build_knn_folders(root / "knn", per_class_train=3, per_class_val=2)
    state = pipeline(
        inputs=[str(root / "dump")],
        out=str(root / "out"),
        recipe="tiny",
        max_steps=2,
        batch_size=4,
        knn_train=str(train),
        knn_val=str(val),
        knn_k=3,
        curate_options={"partition_size": 4},
        return_state=True,
    )
    return root, state


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_subflows_complete_and_outputs_exist(pipeline_run):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    root, state = pipeline_run
    assert state.is_completed()
    summary = state.result()
    with _client() as c:
        children = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
        names = sorted(c.read_flow(r.flow_id).name for r in children)
    assert names == ["curate", "pretrain"] and all(r.state.is_completed() for r in children)

    run = root / "out" / "run"
    report = verify_run(run)
    assert report.ok and summary.curate.ok and report.by_status["sharded"] == 6
    assert summary.pretrain.start_step == 0 and summary.pretrain.end_step == 2
    metrics = read_metrics(root / "out" / "pretrain" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]  # tiny logs every 10 steps and at the last one
    assert summary.pretrain.last_loss == metrics[-1]["loss"]
    knn = json.loads((root / "out" / "pretrain" / "checkpoints" / "step_0000002" / "eval_knn.json").read_text())
    assert knn["top1"] == summary.pretrain.knn_top1 and knn["k"] == 3
    assert knn["n_val"] == 2 * (knn["n_train"] // 3) and 0.0 <= knn["top1"] <= 1.0
    assert not summary.bootstrapped and summary.embedder is None


def test_exported_folder_is_the_teacher(pipeline_run):
    from lvd.pretrain.checkpoint import load_teacher_backbone
    from lvd.pretrain.models.load import load_backbone

    _, state = pipeline_run
    summary = state.result()
    hf = load_backbone(summary.hf_dir)
    teacher = load_teacher_backbone(summary.pretrain.checkpoint)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).cls_BD, teacher(x).cls_BD, rtol=1e-5, atol=1e-5)


def test_artifacts_are_reported(pipeline_run):
    keys = [
        "pretrain-progress",
        "pretrain-losses",
        "pretrain-knn",
        "pretrain-pictures",
        "pretrain-summary",
        "pipeline-summary",
        "curate-ledger-counts",
    ]
    latest = run_artifacts(pipeline_run[1].state_details.flow_run_id, keys)  # this pipeline and its subflows
    assert sorted(latest) == sorted(keys)
    assert latest["pretrain-progress"].data == 100.0
    losses = latest["pretrain-losses"].data
    losses = json.loads(losses) if isinstance(losses, str) else losses
    assert [r["step"] for r in losses] == [2] and losses[0]["lr"] > 0
    assert "data:image/png;base64," in latest["pretrain-pictures"].data
    assert "k-NN top-1" in latest["pipeline-summary"].data


def test_parameters_refused_before_any_work(prefect_harness, tmp_path):
    from lvd.flows.pipeline import pipeline

    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        pipeline(
            inputs=[str(tmp_path / "missing")],
            out=str(out),
            recipe="vitx99",
            max_steps=0,
            knn_train=str(tmp_path),
            nproc_per_node=0,
        )
    text = str(err.value)
    for want in (
        "--input",
        "no such file",
        "unknown recipe 'vitx99'",
        "tiny",
        "--max-steps 0",
        "both --knn-train and --knn-val",
        "--nproc-per-node 0",
    ):
        assert want in text, want
    assert not out.exists()


def test_cli_refuses_with_exit_code_2(prefect_harness, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "pipeline",
        "--input",
        str(tmp_path / "nothing"),
        "--out",
        str(out),
        "--recipe",
        "tiny",
        "--retrieval",
        "hierarchical",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "pass --target-size N" in err and not out.exists()


def test_help_documents_every_flag():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["pipeline"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {
        "--input",
        "--out",
        "--seeds",
        "--eval-sets",
        "--recipe",
        "--max-steps",
        "--knn-train",
        "--knn-val",
        "--nproc-per-node",
    } <= {s for a in flags for s in a.option_strings}
    assert all(a.help for a in flags)


def test_read_metrics_skips_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9, "loss": 1.5}\n{"step": 19, "lo')
    assert read_metrics(path) == [{"step": 9, "loss": 1.5}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_pictures_markdown_embeds_newest_first(tmp_path):
    assert pictures_markdown(tmp_path) is None
    for step in (10, 20, 30):
        (tmp_path / f"step_{step:07d}.png").write_bytes(b"\x89PNG" + bytes([step]))
    md = pictures_markdown(tmp_path)
    assert md.index("step_0000030") < md.index("step_0000020") and "step_0000010" not in md


def test_bootstrap_embedder_without_embedder(ray_local, prefect_harness, tmp_path):
    """Seeds without --embedder: a tiny model is trained on the pool first (curated with hash
    dedup only) and embeds the pool and the seeds; copy detection stays model-free."""
    from lvd.flows.pipeline import pipeline

    testdata.write_photo_jpegs(tmp_path / "pool", 12, side=96)
    testdata.write_photo_jpegs(tmp_path / "seeds", 4, side=96, seed=3)
    out = tmp_path / "out"
    s = pipeline(
        inputs=[str(tmp_path / "pool")],
        out=str(out),
        max_steps=1,
        batch_size=4,
        seeds=[str(tmp_path / "seeds")],
        bootstrap_steps=1,
        curate_options={"partition_size": 4},
    )
    assert s.bootstrapped and s.embedder == str(out / "bootstrap" / "pretrain")
    assert verify_run(out / "bootstrap" / "run").by_status == {"sharded": 12}  # the pool alone
    assert not (out / "bootstrap" / "run" / "copydetect").exists()  # hash dedup only
    assert (out / "bootstrap" / "pretrain" / "checkpoints" / "step_0000001").is_dir()
    report = verify_run(out / "run")
    assert report.ok and report.inputs == 12 and (out / "run" / "retrieve" / "selection.parquet").is_file()
    assert (out / "run" / "embed").is_dir() and s.curate.by_status.get("sharded", 0) >= 1
    assert (out / "run" / "copydetect" / "duplicates.parquet").is_file()
