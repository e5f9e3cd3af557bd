"""Issue 11's end-to-end check, through the CLI as a user runs it: `lvd pipeline` with a seed set
and an eval set on a dump of real photos with copies (the benchmark dump: tiles, bursts,
products, faces, copies of 48 originals, broken files).

Run 1 has no `--embedder`: a tiny bootstrap model is trained on the pool and used for retrieval
only. Run 2 gives `--embedder` a briefly trained tiny model (run 1's bootstrap, 10 steps). Each
run must finish, remove >= 95% of the eval images' families (original + copies) and <= 1% of
the other images, ship the seeds' own pool images (their nearest neighbours), and pass
`lvd verify`.

Slow (two pipelines, about 4-6 min on 2 cores): `scripts/test.sh -m slow tests/flows/test_pipeline_copies.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvd.curation import copies
from lvd.curation import ledger as lg

pytestmark = pytest.mark.slow

KINDS = ("resized", "recompressed", "brightened", "crop40", "flipped", "overlay")


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipecopies")
    truth = copies.write_bench_dump(root / "dump", kinds=KINDS, n_copied=48, extra_broken=True)
    seeds, evals = copies.write_bench_sets(
        root / "dump", truth, root / "seeds", root / "eval", n_seeds=6, n_eval=5, seed=5
    )
    return root, truth, seeds, evals


def _pipeline(root: Path, truth, out: Path, *extra: str) -> int:
    from lvd.cli import main as cli

    argv = ["pipeline", "--out", str(out), "--seeds", str(root / "seeds"), "--eval-sets", str(root / "eval")]
    for d in truth.input_dirs(root / "dump"):
        argv += ["--input", str(d)]
    argv += ["--partition-size", "128", "--shard-size", "200", "--max-steps", "2", "--batch-size", "4", *extra]
    return cli.main(argv)


def _check(root: Path, truth, seeds: list[str], evals: list[str], out: Path) -> None:
    run = out / "run"
    report = lg.verify_run(run)
    assert report.ok, report
    rows = lg.read_ledger(run).to_pylist()
    status = {r["source"]: r["status"] for r in rows}
    original_of = {str(root / "dump" / rel): f.get("original") for rel, f in truth.files.items()}
    family = {p for p, o in original_of.items() if o in evals}
    assert len(family) > 4 * len(evals)
    removed = [status[p] != "sharded" and status[p] != "unselected" for p in family]
    assert sum(removed) >= 0.95 * len(removed), [p for p in family if status[p] in ("sharded", "unselected")]
    others = [p for p in status if p not in family and original_of.get(p) is not None]
    wrongly = [p for p in others if status[p] == "decontaminated"]
    assert len(wrongly) <= 0.01 * len(others), wrongly
    # the seeds' own images are in the pool: retrieval ships each seed's family (its
    # representative may be one of its copies), the nearest neighbour of any embedder
    shipped_families = {original_of.get(r["source"]) for r in rows if r["status"] == "sharded"}
    got = [s for s in seeds if s in shipped_families]
    assert len(got) >= len(seeds) - 1, (seeds, got)


@pytest.fixture(scope="module")
def bootstrap_run(ray_local, prefect_harness, dump):
    root, truth, _, _ = dump
    out = root / "out-bootstrap"
    assert _pipeline(root, truth, out, "--bootstrap-steps", "10") == 0
    return out


def test_pipeline_without_embedder(bootstrap_run, dump):
    root, truth, seeds, evals = dump
    assert (bootstrap_run / "bootstrap" / "pretrain").is_dir()  # the bootstrap model was trained
    _check(root, truth, seeds, evals, bootstrap_run)


def test_pipeline_with_a_briefly_trained_embedder(bootstrap_run, dump):
    root, truth, seeds, evals = dump
    out = root / "out-embedder"
    assert _pipeline(root, truth, out, "--embedder", str(bootstrap_run / "bootstrap" / "pretrain")) == 0
    assert not (out / "bootstrap").exists()
    _check(root, truth, seeds, evals, out)
