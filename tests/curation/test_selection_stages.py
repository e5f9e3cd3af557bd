"""The selection stages without Prefect, on the session's local Ray: shard everything with no
embedder, hierarchical balanced retrieval and cluster-based retrieval with a small random ViT,
and verify's shard-vs-ledger checks against hand-made breakages."""

from __future__ import annotations

import shutil
from pathlib import Path

import _shard_reference
import pyarrow.parquet as pq
import pytest
import torch

from lvd.curation import copies, rundir
from lvd.curation import ledger as lg
from lvd.curation.copydetect import CopyDetectConfig
from lvd.curation.dedup import DedupConfig
from lvd.curation.embed import EmbedConfig
from lvd.curation.guard import MassRemovalError
from lvd.curation.ingest import IngestConfig
from lvd.curation.shards import ShardConfig
from lvd.curation.stages import copy as stages_copy
from lvd.curation.stages import embed as stages_embed
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.stages import select as stages_select
from lvd.curation.stages import shardplan
from lvd.curation.stages.retrieve import RetrieveConfig, run_retrieve

EMBED_KW = {"resize": 128, "crop": 112, "batch_size": 16, "decode_threads": 1}
EMBED = EmbedConfig(**EMBED_KW)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """8 real photos, each with 5 transformed copies (48 files)."""
    root = tmp_path_factory.mktemp("pool")
    for i, (name, img) in enumerate(copies.real_photos()[:8]):
        (root / f"{name}.jpg").write_bytes(copies.encode_original(img))
        for kind, blob in copies.make_copies(img, seed=i).items():
            if kind != "exact":
                (root / f"{name}__{kind}.img").write_bytes(blob)
    return str(root)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    torch.manual_seed(1)
    model = vit_tiny(img_size=112, depth=2)
    with torch.no_grad():  # default layer scales are tiny: photos would all embed alike
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
    return str(export_hf(model, tmp_path_factory.mktemp("w") / "hf"))


def ingest_dedup(inputs, run):
    stages.run_ingest(stages.plan(inputs, 16), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())


# the pool is 8 photos and 40 copies of them: copy detection removes 40 of 48 (83%), above the
# stage's default guard (0.5); the flow's default for dedup and copy detection is 0.9
COPY = CopyDetectConfig(k=8, max_remove=0.9)


def copydetect(run, cfg=COPY):
    """Model-free copy detection (calibrated threshold), the embedder's vectors proposing."""
    stages_copy.run_copyfeat(run)
    stages_copy.run_copydetect(run, cfg, proposers=[run / "vectors"])


@pytest.fixture(scope="module")
def plain_run(ray_local, pool, tmp_path_factory):
    """No embedder: ingest, dedup, shard everything, ledger."""
    run = tmp_path_factory.mktemp("plain")
    ingest_dedup([pool], run)
    stages_select.run_shards(run, ShardConfig(shard_size=5))
    lg.write_ledger(run)
    return run


def test_without_embedder_every_kept_image_is_sharded(plain_run):
    led = lg.read_ledger(plain_run).to_pylist()
    kept = sorted(r["uid"] for r in led if r["status"] not in ("duplicate", "rejected"))
    assert {r["status"] for r in led} <= {"sharded", "duplicate"}
    manifest = pq.read_table(plain_run / "shards" / "manifest.parquet").to_pydict()
    assert manifest["uid"] == kept  # uid order, each once
    n = len(kept)
    assert len(list((plain_run / "shards").glob("shard-*.tar"))) == -(-n // 5)
    assert lg.verify_run(plain_run).ok


def test_ingested_finds_uids_of_every_partition(plain_run):
    """Retrieval ships a seed only when no ingest record of the pool has its bytes; the check
    reads a partition's uids at a time (`rundir.ingested`), not a set of the pool's."""
    parts = rundir.ingest_manifests(plain_run)
    first, last = (pq.read_table(p, columns=["uid"])["uid"].to_pylist()[0] for p in (parts[0], parts[-1]))
    assert len(parts) == 3 and rundir.ingested(plain_run, [first, last, "0" * 64]) == {first, last}
    assert rundir.ingested(plain_run, []) == set()


def test_a_shards_uid_range_reads_only_its_row_groups_of_the_blob_files(plain_run, tmp_path):
    """Shards are cut in uid order, so a shard task asks `read_blobs` for a uid range. The blob
    files are sorted by uid in ~1 MiB row groups, and groups outside the range are not read:
    here they are overwritten with garbage, and the range still reads. (Before, each blob file
    was one group and every shard task read every image of the pool.)"""
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    files = list(rundir.ingest_blob_files(run).values())
    path = max(files, key=lambda p: pq.ParquetFile(p).num_row_groups)
    pf = pq.ParquetFile(path)
    uids = pf.read(columns=["uid"])["uid"].to_pylist()
    assert uids == sorted(uids) and pf.num_row_groups >= 3, (len(uids), pf.num_row_groups)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    keep = 1  # the range: the uids of row group 1 (its neighbours' groups are garbled)
    want = uids[starts[keep] : starts[keep] + sizes[keep]]
    others = [u for f in files if f != path for u in pq.read_table(f, columns=["uid"])["uid"].to_pylist()]
    want = [u for u in want if u not in others]  # held by this file only
    assert want
    intact = rundir.read_blobs(run, want)
    raw = bytearray(path.read_bytes())
    for g in range(pf.num_row_groups):
        if g != keep:
            col = pf.metadata.row_group(g).column(1)  # data
            start = col.dictionary_page_offset or col.data_page_offset
            raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):  # the garbling works: a whole read fails
        pq.read_table(path)
    assert rundir.read_blobs(run, want) == intact


def test_shard_plan_by_uid_ranges_equals_the_row_by_row_plan(ray_local, pool, tmp_path):
    """The plan Ray tasks write (round 1 per partition, round 2 per uid range) ships the rows
    the row-by-row plan it replaced shipped (`_shard_reference`), over one range or many: the
    candidates, each with its first record by source order (exact copies here sort before and
    after their originals, in other partitions)."""
    src = tmp_path / "pool"
    shutil.copytree(pool, src)
    for p in sorted(src.glob("*.jpg")):  # exact copies of the originals, before and after them
        (src / f"0-{p.name}").write_bytes(p.read_bytes())
        (src / f"z-{p.name}").write_bytes(p.read_bytes())
    run = tmp_path / "run"
    ingest_dedup([str(src)], run)
    # unique_accepted (Arrow sorts) keeps the first record by source, as the seen-set it replaced
    rec = rundir.read_ingest(run, ["uid", "source", "status", "width"]).sort_by("source")
    seen: set[str] = set()
    first = [r for r in rec.to_pylist() if r["status"] == "accepted" and not (r["uid"] in seen or seen.add(r["uid"]))]
    assert len(first) < sum(s == "accepted" for s in rec["status"].to_pylist())  # the exact copies
    assert rundir.unique_accepted(run, ["uid", "width"]).to_pylist() == [
        {"uid": r["uid"], "width": r["width"]} for r in first
    ]
    want = _shard_reference.shard_rows(run)
    firsts = {r["uid"]: r["source"] for r in want}
    assert any(Path(s).name.startswith("0-") for s in firsts.values())  # the copy is the first record
    for range_rows, n_files in ((shardplan.RANGE_ROWS, 1), (5, 8)):
        plan = shardplan.plan(run, range_rows=range_rows)
        assert len(plan.files) >= n_files and plan.total == len(want)
        got = [r for i in range(0, plan.total, 7) for r in shardplan.read_rows(plan.slices(i, i + 7))]
        assert _shard_reference.plan_rows(got) == want


@pytest.mark.parametrize("breakage", ["unselect", "extra_tar", "missing_tar"])
def test_verify_catches_shard_ledger_mismatch(plain_run, tmp_path, breakage):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    if breakage == "unselect":  # the ledger says one shipped image was not selected
        path = next(p for p in lg.ledger_files(run) if "sharded" in pq.read_table(p)["status"].to_pylist())
        t = pq.read_table(path).to_pydict()
        t["status"][t["status"].index("sharded")] = "unselected"
        pq.write_table(pq.read_table(path).from_pydict(t, schema=pq.read_schema(path)), path)
        want = "manifest uids are not sharded"
    elif breakage == "extra_tar":
        shutil.copy(run / "shards" / "shard-000000.tar", run / "shards" / "shard-000099.tar")
        want = "not in the manifest"
    else:
        (run / "shards" / "shard-000001.tar").unlink()
        want = "missing"
    report = lg.verify_run(run)
    assert not report.ok and any(want in p for p in report.problems), report.problems


def test_hierarchical_balanced_retrieval_to_target(ray_local, pool, embedder, tmp_path):
    run = tmp_path / "run"
    ingest_dedup([pool], run)
    stages_embed.run_embed(run, embedder, EMBED)
    copydetect(run)
    cands = rundir.candidates(run)
    assert len(cands) == 8  # model-free copy detection leaves one image per photo
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=4, hierarchical=True))
    run_retrieve(run, {}, RetrieveConfig(method="hierarchical", target=6))
    plan = shardplan.plan(run, range_rows=3)  # ships what the row-by-row plan shipped
    rows = _shard_reference.plan_rows(shardplan.read_rows(plan.slices(0, plan.total)))
    assert rows == _shard_reference.shard_rows(run) and len({r["cluster_ids"] for r in rows}) > 1
    rep = stages_select.run_shards(run, ShardConfig(shard_size=4))
    led = lg.write_ledger(run).to_pylist()
    statuses = [r["status"] for r in led]
    assert statuses.count("sharded") == 6 and statuses.count("unselected") == len(cands) - 6
    clusters, tree = stages_select.read_clusters(run)
    assert len(tree.levels) == 2 and clusters["uid"].to_pylist() == cands  # ks (4, 2)
    assert all(len(c) == 2 for c in clusters["cluster_ids"].to_pylist())
    # balanced: 6 over 2 top clusters -> 3 each, or all of a smaller one
    top = dict(zip(cands, tree.labels(2).tolist()))
    sel = pq.read_table(run / "retrieve" / "selection.parquet")["uid"].to_pylist()
    per_top = [sum(top[u] == c for u in sel) for c in (0, 1)]
    sizes = tree.sizes(2).tolist()
    assert sorted(per_top) == sorted([3, 3]) or min(sizes) < 3 and min(per_top) == min(sizes)
    assert lg.verify_run(run).ok and len(rep.ran) == 2
    # rerun: nothing is redone
    again = stages_select.run_shards(run, ShardConfig(shard_size=4))
    assert again.ran == [] and again.skipped == [0, 1]


def test_cluster_based_retrieval_takes_seeded_clusters(ray_local, pool, embedder, tmp_path):
    run = tmp_path / "run"
    ingest_dedup([pool], run)
    seeds_dir = tmp_path / "seedset"
    seeds_dir.mkdir()
    name, img = copies.real_photos()[0]
    (seeds_dir / "s.png").write_bytes(copies.make_copies(img, seed=5)["brightened"])
    seed_run = run / "seeds" / "s"
    ingest_dedup([str(seeds_dir)], seed_run)
    for r in (run, seed_run):
        stages_embed.run_embed(r, embedder, EMBED)
    copydetect(run)
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=3))
    run_retrieve(run, {"s": seed_run}, RetrieveConfig(method="cluster", min_seeds=1, include_seeds=True))
    clusters, tree = stages_select.read_clusters(run)
    (seed_uid,), seed_vec = stages_embed_seed(seed_run)
    from lvd.curation.kmeans import assign_to_centroids

    (c,), _ = assign_to_centroids(seed_vec, tree.levels[0].centroids_KD)
    want = sorted(u for u, leaf in zip(clusters["uid"].to_pylist(), clusters["leaf"].to_pylist()) if leaf == c)
    sel = pq.read_table(run / "retrieve" / "selection.parquet").to_pydict()
    assert sel["uid"] == want and set(sel["cluster_id"]) == {c} and set(sel["method"]) == {"cluster"}
    # the shard plan (uid ranges of 2 records) ships what the row-by-row plan shipped: the
    # selection with its provenance and cluster ids, and the seed with its own run's record
    assert pq.read_table(run / "retrieve" / "selection.seeds.parquet")["uid"].to_pylist() == [seed_uid]
    plan = shardplan.plan(run, range_rows=2)
    rows = _shard_reference.plan_rows(shardplan.read_rows(plan.slices(0, plan.total)))
    assert len(plan.files) > 2 and rows == _shard_reference.shard_rows(run)
    assert {r["retrieval"].get("method") for r in rows} == {"cluster", "seed"}
    assert all(len(r["cluster_ids"]) == 1 for r in rows if r["retrieval"]["method"] == "cluster")
    assert {r["blob_run"] for r in rows if r["retrieval"]["method"] == "seed"} == {str(seed_run)}

    # a copy model (the random ViT) with a cosine threshold every pair passes: copy detection
    # joins the whole pool into one group, and the images without any pHash edge are marked
    # `copy-model`; with the default guard (max_remove 0.5) the stage refuses and writes nothing
    pd = pq.read_table(run / "dedup" / "duplicates.parquet").to_pydict()
    phash = set(pd["uid"]) | set(pd["duplicate_of"])  # images with a pHash edge (members and representatives)
    stages_embed.run_embed(run, embedder, EMBED, stage="copyembed")
    copy_model = (embedder, EMBED_KW)
    shutil.rmtree(run / "copydetect")
    with pytest.raises(Exception) as info:
        stages_copy.run_copydetect(run, CopyDetectConfig(threshold=-0.99), copy_model=copy_model)
    err = info.value
    assert isinstance(err, MassRemovalError) or isinstance(getattr(err, "cause", None), MassRemovalError), repr(err)
    assert "copy detection" in str(err) and "--max-remove-fraction" in str(err)
    assert not (run / "copydetect" / "duplicates.parquet").exists()
    assert not list((run / "copydetect").glob("*.done.json"))  # no done-marker either
    stages_copy.run_copydetect(run, CopyDetectConfig(threshold=-0.99, max_remove=1.0), copy_model=copy_model)
    assert len(rundir.candidates(run)) == 1
    d = pq.read_table(run / "copydetect" / "duplicates.parquet").to_pydict()
    assert {m for u, m in zip(d["uid"], d["method"]) if u not in phash} == {"copy-model"}
    assert stages_copy.calibration(run).method == "copy-model" and stages_copy.calibration(run).source == "user"
    led = lg.write_ledger(run).to_pylist()
    assert sum(r["reason"] == "copy-model" for r in led) == sum(m == "copy-model" for m in d["method"]) > 0


def stages_embed_seed(seed_run):
    from lvd.curation.stages.retrieve import seed_vectors

    return seed_vectors(seed_run)


def test_selection_without_embedder_is_refused(ray_local, prefect_harness, pool, tmp_path, capsys):
    from lvd.cli import main as cli

    argv = ["curate", "--input", pool, "--out", str(tmp_path / "r"), "--seeds", pool, "--target-size", "5"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--seeds, --target-size" in err and "pass --embedder" in err
    assert not (tmp_path / "r").exists()  # refused before any work
