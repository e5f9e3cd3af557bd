"""Curation after dedup (copies, decontamination, selection, shards) end to end through the Prefect flow: real photos + copies (demo dump) as the
pool, a seed set and an eval set, a small random ViT exported as a Hugging Face folder as the
embedder. Copy detection and decontamination need no model (local features decide at a
threshold calibrated on the pool's own images); the embedder only proposes candidates. As a
copy model the random ViT is useless (distinct photos reach cosine 0.995): forced to link every
pair, the flow refuses and leaves the run folder as it was."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from prefect_runs import run_artifacts

from lvd.curation import copies
from lvd.curation import ledger as lg
from lvd.curation.demo import build_demo_dump
from lvd.curation.shards.check import check_shards

OPTS = dict(
    partition_size=16,
    shard_size=4,
    embed={"resize": 128, "crop": 112, "batch_size": 16, "decode_threads": 1},
    copydetect={"k": 8},
    retrieve={"include_seeds": True},
)


FIRST_RUN: dict = {}  # the module's first curate flow run id, set by the `run` fixture


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(img_size=112, depth=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
    return str(export_hf(model, tmp_path_factory.mktemp("weights") / "hf"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    dump = build_demo_dump(root / "dump", n_photos=6)
    photos = copies.real_photos()[:6]
    seeds = root / "seeds"
    seeds.mkdir()
    for name, img in photos[2:4]:  # new bytes of pool photos: retrieval should find them
        (seeds / f"{name}.jpg").write_bytes(copies.make_copies(img, seed=99)["brightened"])
    evalset = root / "evalset"
    evalset.mkdir()
    contaminant = sorted(dump.near_copies)[0]  # a pool original, byte for byte in the eval set
    eval_bytes = Path(contaminant).read_bytes()
    (evalset / "test.jpg").write_bytes(eval_bytes)
    return dump, str(seeds), str(evalset), contaminant, hashlib.sha256(eval_bytes).hexdigest()


def stage_markers(out) -> dict[str, int]:
    """Every done-marker of every stage (pool, seed and eval runs) with its mtime."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.done.json")}


def shard_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def run(ray_local, prefect_harness, data, embedder, tmp_path_factory):
    from lvd.flows.curate import curate

    dump, seeds, evalset, _, _ = data
    out = tmp_path_factory.mktemp("run")
    state = curate(
        inputs=dump.inputs,
        out=str(out),
        seeds=[seeds],
        eval_sets=[evalset],
        embedder=embedder,
        return_state=True,
        **OPTS,
    )
    first = (shard_digests(out), lg.read_ledger(out), stage_markers(out))
    again = curate(inputs=dump.inputs, out=str(out), seeds=[seeds], eval_sets=[evalset], embedder=embedder, **OPTS)
    FIRST_RUN["id"] = state.state_details.flow_run_id  # whose artifacts test_selection_artifacts_reported reads
    return state.result(), again, out, first


def rows(out) -> list[dict]:
    return lg.read_ledger(out).to_pylist()


def test_verify_passes_and_every_input_accounted(run, data):
    summary, _, out, _ = run
    assert summary.ok, summary.problems
    report = lg.verify_run(out)
    assert report.ok, report.problems
    n_inputs = lg.read_ingest(out, ["source"]).num_rows
    assert report.inputs == n_inputs == len(rows(out))
    assert {"sharded", "unselected", "decontaminated", "duplicate", "rejected"} <= set(report.by_status)
    assert "accepted" not in report.by_status  # the shard stage decided every kept image
    assert lg.verify_run(out / "seeds" / "seeds").ok and lg.verify_run(out / "eval" / "evalset").ok


def test_contaminated_component_removed_whole(run, data):
    _, _, out, _ = run
    _, _, _, contaminant, eval_uid = data
    led = {r["source"]: r for r in rows(out)}
    row = led[contaminant]
    root = row["duplicate_of"] if row["status"] == "duplicate" else row["uid"]
    kept = [r for r in led.values() if r["uid"] == root and r["status"] != "duplicate"]
    assert [(r["status"], r["reason"], r["duplicate_of"]) for r in kept] == [("decontaminated", "evalset", eval_uid)]
    component = {r["uid"] for r in led.values() if r["uid"] == root or r["duplicate_of"] == root}
    shipped = set(pq.read_table(out / "shards" / "manifest.parquet")["uid"].to_pylist())
    assert len(component) >= 3 and not component & shipped
    # the ledger's duplicate reasons are copy detection's methods (pHash groups kept, `copy` added)
    cd = pq.read_table(out / "copydetect" / "duplicates.parquet").to_pydict()
    assert set(pq.read_table(out / "dedup" / "duplicates.parquet")["uid"].to_pylist()) <= set(cd["uid"])
    by_uid = {r["uid"]: r["reason"] for r in led.values() if r["status"] == "duplicate" and r["reason"] != "exact"}
    assert by_uid == dict(zip(cd["uid"], cd["method"]))


def test_shards_hold_exactly_the_selection(run):
    _, _, out, _ = run
    led = rows(out)
    seed_led = lg.read_ledger(out / "seeds" / "seeds").to_pylist()
    seeds_shipped = sorted(r["uid"] for r in seed_led if r["status"] == "sharded")
    assert len(seeds_shipped) == 2  # --include-seeds: both seed photos (new bytes) ship
    sharded = sorted(r["uid"] for r in led if r["status"] == "sharded")
    manifest = pq.read_table(out / "shards" / "manifest.parquet").to_pydict()
    assert sorted(manifest["uid"]) == sorted(sharded + seeds_shipped) and len(set(manifest["uid"])) == len(
        manifest["uid"]
    )
    sel = pq.read_table(out / "retrieve" / "selection.parquet").to_pydict()
    assert sorted(sel["uid"]) == sharded and 0 < len(sharded) <= 2 * 4  # k=4 per seed, collisions kept once
    assert set(sel["seed_set"]) == {"seeds"} and set(sel["seed_uid"]) <= set(seeds_shipped)
    removed = {
        r["uid"] for r in led if r["status"] in ("duplicate", "decontaminated") and r["duplicate_of"] != r["uid"]
    }
    removed -= {r["uid"] for r in led if r["status"] == "sharded"}  # exact copies share the shipped uid
    assert not removed & set(manifest["uid"])
    assert check_shards(out / "shards").ok
    for tar_path in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            for name in names:
                payload = tar.extractfile(name).read()
                if name.endswith(".json"):
                    meta = json.loads(payload)
                    assert meta["retrieval"]["seed_set"] == "seeds"
                    if meta["uid"] in seeds_shipped:
                        assert meta["retrieval"]["method"] == "seed" and meta["cluster_ids"] == []
                    else:
                        assert meta["uid"] in sharded and len(meta["cluster_ids"]) == 1
                else:
                    Image.open(io.BytesIO(payload)).load()
        assert len(names) <= 2 * OPTS["shard_size"]


def test_rerun_is_byte_identical(run):
    _, again, out, (digests, ledger_before, markers_before) = run
    assert again.ok and again.ingest_ran == 0
    stages_done = {k.split("/")[-2] for k in markers_before}
    assert {
        "ingest",
        "dedup",
        "copyfeat",
        "embed",
        "copydetect",
        "decontam",
        "cluster",
        "retrieve",
        "shard_parts",
    } <= stages_done
    assert stage_markers(out) == markers_before  # every stage resumed from its markers: nothing redone
    assert digests and shard_digests(out) == digests
    assert lg.read_ledger(out).equals(ledger_before)


def test_tampered_shard_fails_verify(run, tmp_path):
    import shutil

    from lvd.cli.main import main

    _, _, out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert main(["verify", str(copy)]) == 0
    tar = sorted((copy / "shards").glob("shard-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    tar.write_bytes(bytes(data))
    report = lg.verify_run(copy)
    assert not report.ok and any(tar.name in p for p in report.problems)
    assert main(["verify", str(copy)]) == 1


def test_selection_artifacts_reported(run):
    keys = [
        "curate-embed-pool-progress",
        "curate-embed-pool-counts",
        "curate-copydetect-counts",
        "curate-decontam-counts",
        "curate-cluster-counts",
        "curate-cluster-montage",
        "curate-retrieve-counts",
        "curate-retrieve-histogram",
        "curate-retrieve-pairs",
        "curate-shard-progress",
        "curate-shard-counts",
    ]
    latest = run_artifacts(FIRST_RUN["id"], keys)  # the first run's, not another test's
    assert set(latest) == set(keys)
    assert float(latest["curate-shard-progress"].data) == 100.0
    assert "evalset" in latest["curate-decontam-counts"].data
    assert "n_collisions" in latest["curate-retrieve-counts"].data
    for key in ("curate-cluster-montage", "curate-retrieve-pairs", "curate-retrieve-histogram"):
        md = latest[key].data
        assert "](data:image/png;base64," in md and len(md) < 200_000, key
    png = latest["curate-retrieve-histogram"].data.split("base64,")[1].rstrip(")")
    img = Image.open(io.BytesIO(__import__("base64").b64decode(png)))
    assert img.format == "PNG" and img.size == (320, 120)


def folder_digests(out) -> dict[str, str]:
    """Every file (sha256) and folder under `out`."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(out.rglob("*"))
    }


def test_copy_model_linking_everything_completes_then_is_refused(ray_local, prefect_harness, data, embedder, tmp_path):
    """A copy model that sees every image alike (the random ViT) at a cosine threshold every
    pair passes joins the whole pool into one group, and the eval image matches it.
    - allowed to remove everything (max_remove_fraction=1): retrieval has nothing to cluster,
      and the run still finishes with an empty selection and a consistent ledger;
    - with the default guard (copy detection may remove 90%) the flow refuses with
      MassRemovalError naming the stage, the fraction and the flag, and the run folder is byte
      for byte what it was before the call (only the guard's limit differs between the calls,
      so nothing else in the folder has a reason to change)."""
    from lvd.curation.guard import MassRemovalError
    from lvd.flows.curate import curate

    dump, seeds, evalset, _, _ = data
    # 8 calibration images (not 64): the guard's decision does not depend on them, and the
    # copy model's calibration is most of this test's time
    copydetect = {**OPTS["copydetect"], "threshold": -1.0, "calib_images": 8}
    opts = {**OPTS, "copy_model": embedder, "copydetect": copydetect}
    kw = dict(inputs=dump.inputs, out=str(tmp_path), seeds=[seeds], eval_sets=[evalset], embedder=embedder, **opts)
    summary = curate(**kw, max_remove_fraction=1.0)
    assert summary.ok
    statuses = {r["status"] for r in rows(tmp_path)}
    assert "sharded" not in statuses and "decontaminated" in statuses
    assert lg.verify_run(tmp_path).ok
    cd = pq.read_table(tmp_path / "copydetect" / "duplicates.parquet").to_pydict()
    assert "copy-model" in cd["method"]

    before = folder_digests(tmp_path)
    with pytest.raises(MassRemovalError) as info:
        curate(**kw)
    msg = str(info.value)
    assert "copy detection" in msg and re.search(r"\d+\.\d%", msg) and "--max-remove-fraction" in msg, msg
    assert info.value.stage == "copy detection" and info.value.removed / info.value.total > 0.9
    assert folder_digests(tmp_path) == before
