"""Vector store: atomic parts, memory-mapped round trip, lookup by uid, blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lvd.curation.vectors import open_vectors, part_paths, write_vectors


def unit16(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture()
def store_dir(tmp_path):
    # parts written out of order, one of them empty; uids of different lengths
    parts = {
        2: (["c0", "c1"], unit16(2, 8, 2)),
        0: ([f"a{i}" for i in range(5)], unit16(5, 8, 0)),
        1: ([], np.zeros((0, 8), np.float16)),
        3: (["d-long-uid"], unit16(1, 8, 3)),
    }
    for idx, (uids, vecs) in parts.items():
        write_vectors(tmp_path, idx, uids, vecs)
    return tmp_path, parts


def test_round_trip_is_memory_mapped_and_in_part_order(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    order = sorted(parts)
    assert store.part_indices == order and len(store) == 8 and store.dim == 8
    assert store.uids.tolist() == [u for i in order for u in parts[i][0]]
    everything = np.concatenate([parts[i][1] for i in order])
    loaded = store.load()
    assert loaded.vecs_ND.dtype == np.float16
    np.testing.assert_array_equal(loaded.vecs_ND, everything)
    assert loaded.uids.tolist() == store.uids.tolist()
    assert isinstance(store._parts[0].vecs_ND, np.memmap)  # mapped, not read


def test_get_by_uid_in_asked_order_and_unknown_uid(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    got = store.get(["d-long-uid", "a3", "c0", "a3"])
    want = np.stack([parts[3][1][0], parts[0][1][3], parts[2][1][0], parts[0][1][3]])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(KeyError, match="a9"):
        store.get(["a1", "a9"])
    with pytest.raises(KeyError, match="d-long-uid-longer"):  # longer than any stored uid
        store.get(["d-long-uid-longer"])


def test_blocks_cover_every_row_once_without_spanning_parts(store_dir):
    folder, parts = store_dir
    store = open_vectors(folder)
    blocks = list(store.blocks(block_rows=2))
    assert [b.start for b in blocks] == [0, 2, 4, 5, 7]
    assert [len(b.uids) for b in blocks] == [2, 2, 1, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b.vecs_ND for b in blocks]), store.load().vecs_ND)
    assert sum((b.uids.tolist() for b in blocks), []) == store.uids.tolist()


def test_incomplete_part_is_invisible_and_temp_files_cleaned(tmp_path):
    write_vectors(tmp_path, 0, ["x"], unit16(1, 4, 0))
    npy, _ = part_paths(tmp_path, 1)
    np.save(npy, unit16(3, 4, 1))  # a crash after the vectors, before the uids file
    assert open_vectors(tmp_path).uids.tolist() == ["x"]
    with pytest.raises(ValueError, match="one uid per row"):
        write_vectors(tmp_path, 2, ["y"], unit16(2, 4, 2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rejects_wrong_dtype_and_repeated_uids(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        write_vectors(tmp_path, 0, ["a"], np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="repeated"):
        write_vectors(tmp_path, 0, ["a", "a"], unit16(2, 4, 0))
    with pytest.raises(FileNotFoundError):
        open_vectors(tmp_path / "none")


# ---------------------------------------------------------------- precomputed vectors (--vectors DIR)

EMBED_KW = {"resize": 128, "crop": 112, "batch_size": 16, "decode_threads": 1}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import torch

    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.models.vit import vit_tiny

    torch.manual_seed(2)
    model = vit_tiny(img_size=112, depth=2)
    with torch.no_grad():  # default layer scales are tiny: photos would all embed alike
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
    return str(export_hf(model, tmp_path_factory.mktemp("w") / "hf"))


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    from lvd.curation import testdata

    root = tmp_path_factory.mktemp("dump")
    testdata.write_photo_jpegs(root, 12, side=96)
    return str(root)


def ingested(dump: str, run: Path) -> Path:
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    stages.run_ingest(stages.plan([dump], 5), run, IngestConfig())  # 3 partitions
    stages.run_dedup(run, DedupConfig())
    return run


@pytest.fixture(scope="module")
def ingested_run(ray_local, dump, tmp_path_factory) -> Path:
    return ingested(dump, tmp_path_factory.mktemp("ingested"))


@pytest.fixture(scope="module")
def reference(ingested_run, tmp_path_factory):
    """Random unit vectors laid out as the embedder lays them out for `ingested_run`: one part
    per ingest partition, its blob uids in order (what given vectors must reproduce)."""
    import pyarrow.parquet as pq

    from lvd.curation import rundir

    folder = tmp_path_factory.mktemp("reference")
    for index, blobs in rundir.ingest_blob_files(ingested_run).items():
        uids = pq.read_table(blobs, columns=["uid"])["uid"].to_pylist()
        write_vectors(folder, index, uids, unit16(len(uids), 16, seed=index))
    return folder


@pytest.fixture(scope="module")
def embedded(ray_local, embedder, dump, tmp_path_factory):
    """A run embedded by the embedder and clustered: the reference for given vectors."""
    from lvd.curation.embed import EmbedConfig
    from lvd.curation.stages import embed as stages_embed
    from lvd.curation.stages import select as stages_select

    run = ingested(dump, tmp_path_factory.mktemp("embedded"))
    stages_embed.run_embed(run, embedder, EmbedConfig(**EMBED_KW))
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=3))
    return run


def sources_of(run: Path) -> dict[str, str]:
    """uid -> its first accepted source (what a job embedding files by path would key by)."""
    from lvd.curation import rundir

    t = rundir.read_ingest(run, ["source", "status", "uid"]).sort_by("source").to_pylist()
    out: dict[str, str] = {}
    for r in t:
        if r["status"] == "accepted":
            out.setdefault(r["uid"], r["source"])
    return out


def export_parquet(store, folder: Path, *, key: str = "uid", keys=None, chunks: int = 2, scale=1.0, drop=0) -> Path:
    """The store's vectors as Parquet parts (float32 lists), keyed by uid or `keys[uid]`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    emb = store.load()
    names = [keys[u] if keys else u for u in emb.uids.tolist()][drop:]
    vecs = (emb.vecs_ND.astype(np.float32) * scale)[drop:]
    for c in range(chunks):
        sl = slice(c, None, chunks)
        table = pa.table({key: names[sl], "vector": pa.array(list(vecs[sl]), pa.list_(pa.float32()))})
        pq.write_table(table, folder / f"emb-{c}.parquet", row_group_size=2)  # small row groups: gathered by group
    return folder


def test_given_vectors_by_uid_written_as_parts(ingested_run, reference, tmp_path):
    import shutil

    from lvd.curation import rundir
    from lvd.curation.stages import embed as stages_embed

    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    reference = open_vectors(reference)
    rep = stages_embed.run_given(run, export_parquet(reference, tmp_path / "given", chunks=3))
    assert rep.ran == [0, 1, 2] and all(m["normalised"] == 0 for m in rep.markers.values())
    got = open_vectors(rundir.vectors_dir(run))
    assert got.part_indices == reference.part_indices and got.uids.tolist() == reference.uids.tolist()
    np.testing.assert_array_equal(got.load().vecs_ND, reference.load().vecs_ND)  # fp16, bit for bit


@pytest.mark.slow  # an embedder actor and two cluster stages: about 40 s on 2 cores
def test_given_vectors_by_uid_equal_the_embedders_and_give_the_same_clusters(embedded, dump, tmp_path):
    from lvd.curation import rundir
    from lvd.curation.stages import embed as stages_embed
    from lvd.curation.stages import select as stages_select

    want = open_vectors(rundir.vectors_dir(embedded))
    given = export_parquet(want, tmp_path / "given")
    run = ingested(dump, tmp_path / "run")
    rep = stages_embed.run_given(run, given)
    assert rep.ran == [0, 1, 2] and all(m["normalised"] == 0 for m in rep.markers.values())
    got = open_vectors(rundir.vectors_dir(run))
    assert got.part_indices == want.part_indices  # per partition, as the embedder writes them
    assert got.uids.tolist() == want.uids.tolist()
    np.testing.assert_array_equal(got.load().vecs_ND, want.load().vecs_ND)  # fp16, bit for bit
    stages_select.run_cluster(run, stages_select.ClusterConfig(k=3))
    assert rundir.clusters(run)[0].equals(rundir.clusters(embedded)[0])
    assert rundir.clusters(run)[1].equals(rundir.clusters(embedded)[1])
    assert stages_embed.run_given(run, given).ran == []  # done: not imported again


def test_given_npy_by_source_is_l2_normalised(ingested_run, reference, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lvd.curation import rundir
    from lvd.curation.stages import embed as stages_embed

    want = open_vectors(reference).load()
    src = sources_of(ingested_run)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "all.npy", want.vecs_ND.astype(np.float32)[::-1] * 3.0)  # rows in another order, norm 3
    pq.write_table(pa.table({"source": [src[u] for u in want.uids.tolist()][::-1]}), folder / "all.keys.parquet")
    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    rep = stages_embed.run_given(run, folder)
    assert sum(m["normalised"] for m in rep.markers.values()) == len(want.uids)
    got = open_vectors(rundir.vectors_dir(run)).load()
    assert got.uids.tolist() == want.uids.tolist()
    np.testing.assert_allclose(got.vecs_ND.astype(np.float32), want.vecs_ND.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got.vecs_ND.astype(np.float32), axis=1), 1.0, atol=2e-3)


def refused(run: Path, folder: Path) -> str:
    from lvd.curation.stages import embed as stages_embed
    from lvd.curation.vectors import GivenVectorsError

    with pytest.raises(GivenVectorsError) as info:
        stages_embed.run_given(run, folder)
    return str(info.value)


def test_given_vectors_missing_nan_duplicate_bad_dim_refused(ingested_run, reference, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lvd.curation import rundir

    store = open_vectors(reference)
    uids = store.uids.tolist()
    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    # two images without a vector: how many, and the first ones by name; their partition stays undone
    msg = refused(run, export_parquet(store, tmp_path / "missing", drop=2))
    assert "2 accepted images have no vector" in msg and uids[0] in msg and uids[1] in msg
    marks = sorted(p.name for p in rundir.stage_dir(run, "embed").glob("*.done.json"))
    assert marks == ["part-000001.done.json", "part-000002.done.json"]
    # a NaN, and a zero vector
    nan = export_parquet(store, tmp_path / "nan", chunks=1)
    t = pq.read_table(nan / "emb-0.parquet").to_pydict()
    t["vector"][3] = [float("nan")] * len(t["vector"][3])
    t["vector"][4] = [0.0] * len(t["vector"][4])
    pq.write_table(pa.table(t), nan / "emb-0.parquet")
    msg = refused(run, nan)
    assert "1 vectors are not finite" in msg and uids[3] in msg and "1 vectors are zero" in msg and uids[4] in msg
    # a uid given twice (two files)
    twice = export_parquet(store, tmp_path / "twice", chunks=1)
    pq.write_table(pq.read_table(twice / "emb-0.parquet").slice(0, 1), twice / "again.parquet")
    assert "1 keys have more than one vector" in refused(run, twice)
    # files of two dimensions; a list of the wrong length
    dims = export_parquet(store, tmp_path / "dims", chunks=1)
    pq.write_table(
        pa.table({"uid": ["x"], "vector": pa.array([[1.0, 0.0]], pa.list_(pa.float32()))}), dims / "x.parquet"
    )
    assert "different dimensions" in refused(run, dims)
    short = export_parquet(store, tmp_path / "short", chunks=1)
    t = pq.read_table(short / "emb-0.parquet").to_pydict()
    t["vector"][5] = t["vector"][5][:-1]
    pq.write_table(pa.table(t), short / "emb-0.parquet")
    assert "values, not" in refused(run, short)
    # no key column, no vectors at all
    bad = tmp_path / "nokey"
    bad.mkdir()
    pq.write_table(pa.table({"name": ["a"], "vector": [[1.0]]}), bad / "a.parquet")
    assert "key column" in refused(run, bad)
    assert "no vectors found" in refused(run, tmp_path / "twice" / "..")  # tmp_path: no parquet, no npy


def test_cli_curate_with_vectors_clusters_as_the_store_would(
    ingested_run, reference, dump, prefect_harness, tmp_path, capsys
):
    """`lvd curate --vectors` against the cluster stage run on the same vectors placed in the
    store directly (the slow test above: the same against the embedder)."""
    import shutil

    from lvd.cli import main as cli
    from lvd.curation import rundir
    from lvd.curation.stages import select as stages_select

    ref_run = tmp_path / "ref"
    shutil.copytree(ingested_run, ref_run)
    shutil.copytree(reference, rundir.vectors_dir(ref_run))
    stages_select.run_cluster(ref_run, stages_select.ClusterConfig(k=3))
    given = export_parquet(open_vectors(reference), tmp_path / "given")
    argv = ["curate", "--input", dump, "--partition-size", "5", "--no-copy-detection", "--clusters", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "run"), "--vectors", str(given)]) == 0
    assert "OK: every input is accounted for" in capsys.readouterr().out
    assert rundir.clusters(tmp_path / "run")[0].equals(rundir.clusters(ref_run)[0])
    missing = export_parquet(open_vectors(reference), tmp_path / "missing", drop=1)
    assert cli.main([*argv, "--out", str(tmp_path / "run2"), "--vectors", str(missing)]) == 2
    assert "1 accepted images have no vector" in capsys.readouterr().err
