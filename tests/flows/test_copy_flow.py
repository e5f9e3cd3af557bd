"""`lvd curate` with an eval set and no embedder, on a dump of real photos with copies it was not
tuned on (the benchmark dump: tiles, bursts, products, faces, and copies of a quarter of them):
copy detection and decontamination run model-free; the eval images' copies leave the pool and
almost nothing else does; `lvd verify` passes. Then a deliberately bad setting (a random-init
copy model forced to cosine 0.1, on 40 of the dump's originals) trips the guard: non-zero exit,
one message, no run folder left, and the good run's folder byte for byte what it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lvd.curation import copies
from lvd.curation import ledger as lg

KINDS = ("resized", "recompressed", "brightened", "crop40", "flipped", "overlay")


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("copyflow")
    truth = copies.write_bench_dump(root / "dump", kinds=KINDS, n_copied=48, extra_broken=True)
    _, evals = copies.split_sets(truth, n_seeds=0, n_eval=5, seed=3)
    eval_dir = root / "eval"
    eval_dir.mkdir()
    for name in evals:
        src = root / "dump" / truth.originals[name]["file"]
        (eval_dir / src.name).write_bytes(src.read_bytes())
    return root, truth, evals, eval_dir


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(ray_local, prefect_harness, dump):
    from lvd.cli import main as cli

    root, truth, _, eval_dir = dump
    out = root / "run"
    argv = ["curate", "--out", str(out), "--eval-sets", str(eval_dir), "--partition-size", "128", "--shard-size", "200"]
    for d in truth.input_dirs(root / "dump"):
        argv += ["--input", str(d)]
    assert cli.main(argv) == 0
    return out, argv


def test_eval_copies_removed_and_little_else(run, dump):
    out, _ = run
    root, truth, evals, _ = dump
    status = {r["source"]: r["status"] for r in lg.read_ledger(out).to_pylist()}
    family = {f"{root / 'dump' / rel}" for rel, f in truth.files.items() if f.get("original") in evals}
    assert len(family) > len(evals) * 4  # originals + their copies are in the pool
    removed = [s != "sharded" for p, s in status.items() if p in family]
    assert sum(removed) / len(removed) >= 0.95, sum(removed)
    decon = [p for p, s in status.items() if s == "decontaminated"]
    others = [p for p, f in status.items() if p not in family and "/broken/" not in p]
    wrongly = [p for p in decon if p not in family]
    assert len(wrongly) <= 0.01 * len(others), wrongly
    assert lg.verify_run(out).ok


def test_copy_detection_ran_calibrated_and_reported(run):
    from lvd.curation.stages import copy as stages_copy

    out, _ = run
    cal = stages_copy.calibration(out)
    assert cal.source == "calibrated" and cal.method == "copy" and cal.copy_recall > 0.8, cal.summary()
    d = pq.read_table(out / "copydetect" / "duplicates.parquet")
    assert {"copy", "phash"} <= set(d["method"].to_pylist())  # crops/overlays need the detector


def test_weakest_links_are_shown(run):
    """The decided links with the least evidence, weakest first, as pictures in the Prefect UI:
    where a distinct look-alike would show."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from lvd.curation.stages import copy as stages_copy

    out, _ = run
    weak = stages_copy.weakest_links(out, 6)
    d = pq.read_table(out / "copydetect" / "duplicates.parquet").to_pylist()
    inliers = sorted(round(1 / r["distance"] - 1) for r in d if r["method"] == "copy")
    assert [s for *_, s in weak] == inliers[: len(weak)] and len(weak) == min(6, len(inliers))
    threshold = stages_copy.calibration(out).threshold
    with get_client(sync_client=True) as c:
        (art,) = c.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-copydetect-weakest"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    rows = [line for line in art.data.splitlines() if line.startswith("| ") and "inliers" in line]
    assert len(rows) == len(weak) and art.data.count("](data:image/png;base64,") == 2 * len(weak)
    for line, (uid, _, _, score) in zip(rows, weak):
        assert line.startswith(f"| {score:g} inliers") and f"![{uid[:8]}](data:image/png;base64," in line
        # below the threshold only when joined through a hash duplicate (chain splitting's units)
        assert ("through a hash duplicate" in line) == (score < threshold), line


def test_a_bad_copy_setting_trips_the_guard_and_changes_nothing(run, dump, tmp_path, capsys):
    """A random-init ViT as copy model with a forced cosine of 0.1 links nearly everything:
    the flow refuses, says which stage, how much and which flag, and rolls the run folder back
    to what it was before the flow: here it did not exist, so it does not exist after."""
    from lvd.cli import main as cli
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    out, _ = run
    root, _, _, eval_dir = dump
    torch.manual_seed(0)
    model = export_hf(vit_tiny(img_size=112, depth=2), tmp_path / "random-vit")
    # a pool of 40 of the dump's originals: the guard's decision does not need the whole dump
    small = tmp_path / "small"
    small.mkdir()
    for src in sorted((root / "dump" / "originals").iterdir())[:40]:
        (small / src.name).write_bytes(src.read_bytes())
    fresh = tmp_path / "bad-run"
    before = _digests(out)
    bad = ["curate", "--out", str(fresh), "--eval-sets", str(eval_dir), "--input", str(small)]
    capsys.readouterr()
    code = cli.main(bad + ["--copy-model", str(model), "--copy-threshold", "0.1"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "copy detection would remove" in lines[0] and "--max-remove-fraction" in lines[0], err
    assert "Traceback" not in err
    assert not fresh.exists()
    assert _digests(out) == before  # the good run beside it is untouched
