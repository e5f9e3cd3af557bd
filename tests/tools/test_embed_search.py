"""lvd embed / index / search on real photos with the tiny test backbone: output layout and
shapes, unreadable inputs listed, shards = folder, the real local Ray's embedding actors (and
`lvd embed --ray`) = the in-process vectors, real Faiss indexes: exact top-1 is the image
itself, IVF with every list probed = exact, ranks = numpy cosine, montage size and content. No
mocks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.curation.actor_runner import ActorConfig
from lvd.tools.embed import EmbedConfig, embed
from lvd.tools.features import FeatureConfig, extract_batch
from lvd.tools.images import open_image
from lvd.tools.montage import GAP, fit_tile, montage_size, write_montage
from lvd.tools.search import (
    IndexBuildConfig,
    SearchIndex,
    build_index_dir,
    search_images,
)

SIZE = 112  # 8 x 8 patches; the checkpoint's native grid is 4 x 4, so positions are interpolated
# CPU float32 everywhere: the comparisons below are tighter than bf16 autocast on a GPU allows
CFG = EmbedConfig(features=FeatureConfig(size=SIZE, patches=True, batch_size=3, device="cpu"), chunk=3, ray=False)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """8 photos (JPEG, PNG, one in a subfolder) and 3 files that are not images."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, (name, img) in enumerate(photos):
        if i % 3 == 2:
            img.save(root / f"{name}.png")
        else:
            (root / ("sub" if i == 1 else ".") / f"{name}.jpg").write_bytes(jpeg(img))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not a picture")
    (root / "truncated.jpg").write_bytes(jpeg(photos[0][1])[:300])
    return root


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_backbone, folder):
    return embed(tiny_backbone.lvd, folder, tmp_path_factory.mktemp("emb") / "out", CFG)


@pytest.fixture(scope="module")
def index(tmp_path_factory, embedded):
    return build_index_dir(embedded.root, tmp_path_factory.mktemp("idx") / "exact", IndexBuildConfig(kind="exact"))


def test_layout_shapes_and_row_order(embedded, folder, photos):
    ids = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*") if p.stem in dict(photos))
    assert embedded.ids == ids and len(ids) == 8
    assert embedded.paths == [str(folder / i) for i in ids]
    assert embedded.cls_ND.shape == (8, 192) and embedded.cls_ND.dtype == np.float32
    assert embedded.patches_NhwD.shape == (8, 8, 8, 192) and embedded.patches_NhwD.dtype == np.float16
    table = pq.read_table(embedded.root / "embeddings.parquet")
    assert table.schema.field("cls").type == pa.list_(pa.float32())
    assert table["row"].to_pylist() == list(range(8)) and table["id"].to_pylist() == ids
    np.testing.assert_array_equal(np.array(table["cls"].to_pylist(), np.float32), embedded.cls_ND)
    meta = json.loads((embedded.root / "meta.json").read_text())
    assert meta["count"] == 8 and meta["skipped"] == 3 and meta["grid"] == [8, 8] and meta["resize"] == 128
    assert not list(embedded.root.glob("*.part"))


def test_rows_are_the_features_of_their_images(embedded, tiny_backbone):
    # JPEGs are DCT-downscaled while decoding, as far as the 128 px resize allows
    images = [open_image(p, min_side=128) for p in embedded.paths]
    want = extract_batch(tiny_backbone.model, images, replace(CFG.features, batch_size=8))
    np.testing.assert_allclose(embedded.cls_ND, want.cls_BD, atol=1e-5)
    np.testing.assert_allclose(embedded.patches_NhwD, want.patches_BhwD.astype(np.float16), atol=2e-3)


def test_unreadable_inputs_are_listed_with_a_reason(embedded):
    skipped = {r["id"]: r["reason"] for r in embedded.skipped.to_pylist()}
    assert sorted(skipped) == ["empty.jpg", "text.png", "truncated.jpg"]
    assert all(reason.startswith("decode_error: ") for reason in skipped.values())


def test_shards_give_the_folder_vectors(tmp_path, tiny_backbone, photos, embedded):
    """Curation shards of the same JPEG bytes (kept byte-identical), plus a tar with a sample
    without an image and one with a broken JPEG: ids are the uids, paths TAR::KEY.jpg."""
    from lvd.curation.shards import ShardConfig, ShardSample, write_shards

    blobs = {name: jpeg(img) for name, img in photos}
    samples = [
        ShardSample(uid=hashlib.sha256(b).hexdigest(), source=n, width=1, height=1, data=b) for n, b in blobs.items()
    ]
    write_shards(samples, tmp_path / "shards", ShardConfig(shard_size=3))
    with tarfile.open(tmp_path / "shards" / "shard-000099.tar", "w") as tar:
        for name, payload in (("x1.json", b'{"uid": "only-json"}'), ("x2.jpg", b"\xff\xd8broken")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    got = embed(tiny_backbone.lvd, tmp_path / "shards", tmp_path / "out", CFG)
    by_uid = {s.uid: s.source for s in samples}
    assert sorted(got.ids) == sorted(by_uid)
    assert all("/shard-0000" in p and p.endswith(".jpg") and "::" in p for p in got.paths)
    reasons = {r["id"]: r["reason"].split(":")[0] for r in got.skipped.to_pylist()}
    assert reasons == {"only-json": "no_image_member", "x2": "decode_error"}
    # the folder's JPEG files hold the same bytes
    folder_row = {i.rsplit("/", 1)[-1].split(".")[0]: r for r, i in enumerate(embedded.ids)}
    for row, uid in enumerate(got.ids):
        name = by_uid[uid]
        if embedded.ids[folder_row[name]].endswith(".jpg"):
            np.testing.assert_allclose(got.cls_ND[row], embedded.cls_ND[folder_row[name]], atol=1e-5)
    assert np.asarray(open_image(got.paths[0])).shape[2] == 3  # a member can be opened by its path


def test_ray_actors_give_the_in_process_vectors(tmp_path, ray_local, tiny_backbone, folder, embedded):
    cfg = replace(CFG, ray=True, actors=ActorConfig(n_actors=2))
    with contextlib.chdir(tmp_path):  # relative paths: the actors' working directory is not ours
        got = embed(os.path.relpath(tiny_backbone.lvd), os.path.relpath(folder), "ray", cfg)
    assert got.meta["model"] == str(tiny_backbone.lvd.resolve())
    assert got.meta["ray"] and got.meta["units"] == 4
    assert got.ids == embedded.ids and got.skipped.equals(embedded.skipped)
    with pytest.raises(FileNotFoundError, match="does not exist; pass an HF Dinov2 folder"):
        embed(tmp_path / "no-model", folder, tmp_path / "never", cfg)
    np.testing.assert_allclose(got.cls_ND, embedded.cls_ND, atol=1e-5)
    np.testing.assert_allclose(got.patches_NhwD.astype(np.float32), embedded.patches_NhwD.astype(np.float32), atol=2e-3)


def test_exact_search_finds_each_image_first_with_numpy_ranks(index, embedded):
    assert index.meta["kind"] == "exact" and index.meta["count"] == 8
    hits = index.search(np.asarray(embedded.cls_ND), k=8)
    unit = embedded.cls_ND / np.linalg.norm(embedded.cls_ND, axis=1, keepdims=True)
    cos = unit @ unit.T
    for q, row in enumerate(hits):
        assert row[0].row == q and row[0].id == embedded.ids[q] and row[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.row for h in row] == list(np.argsort(-cos[q], kind="stable"))
        np.testing.assert_allclose([h.score for h in row], np.sort(cos[q])[::-1], atol=1e-5)
        assert [h.rank for h in row] == list(range(1, 9))


def test_ivf_probing_every_list_equals_exact(tmp_path, embedded, index):
    ivf = build_index_dir(embedded.root, tmp_path / "ivf", IndexBuildConfig(kind="ivf", nlist=2, nprobe=2))
    assert ivf.meta["kind"] == "ivf" and ivf.meta["nlist"] == 2
    again = SearchIndex.load(tmp_path / "ivf")  # nprobe comes back from meta.json
    q = np.asarray(embedded.cls_ND)
    want = [[h.row for h in row] for row in index.search(q, k=5)]
    assert [[h.row for h in row] for row in again.search(q, k=5)] == want


def test_query_image_is_embedded_like_the_index(index, embedded, photos):
    name, img = photos[2]  # saved as PNG: lossless, so the query is the indexed image
    assert embedded.ids[index.search(embedded.cls_ND[[0]], 1)[0][0].row] == embedded.ids[0]
    hit = search_images(index, [img], k=3, device="cpu")[0][0]  # model, size, resize from the index's meta
    assert hit.id == f"{name}.png" and hit.score == pytest.approx(1.0, abs=1e-4)


def test_montage_size_and_content(tmp_path, index, embedded, photos):
    query = photos[2][1]
    hits = search_images(index, [query], k=5, device="cpu")[0]
    out = write_montage(query, hits, tmp_path / "m.png", tile=64)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert sheet.shape == (GAP + 64 + 34, GAP + 6 * (64 + GAP) + 2 * GAP, 3) == (104, 438, 3)
    assert montage_size(5, 64) == (438, 104)
    assert sheet.std() > 20  # not constant
    np.testing.assert_array_equal(sheet[GAP : GAP + 64, GAP : GAP + 64], np.asarray(fit_tile(query, 64)))
    x = GAP + 64 + 3 * GAP  # the first neighbour: the query image itself
    assert np.abs(sheet[GAP : GAP + 64, x : x + 64] - np.asarray(fit_tile(open_image(hits[0].path), 64))).mean() < 3
    for i in range(6):  # every caption holds dark text
        x0 = GAP + i * (64 + GAP) + (2 * GAP if i else 0)
        assert sheet[GAP + 64 + 2 :, x0 : x0 + 64].min() < 100


def test_cli_embed_index_search(tmp_path, capsys, ray_local, tiny_backbone, folder, embedded):
    from lvd.cli.main import main

    with contextlib.chdir(tmp_path):  # the default montage goes to the current folder
        args = ["--images", str(folder), "--out", str(tmp_path / "emb"), "--size", str(SIZE), "--device", "cpu"]
        assert main(["embed", "--model", str(tmp_path / "nope"), *args]) == 2
        assert "--model" in capsys.readouterr().err and not (tmp_path / "emb").exists()
        # the command's Ray path on the session's real local Ray (the in-process path: test above)
        assert main(["embed", "--model", str(tiny_backbone.official), *args, "--ray"]) == 0
        assert "embedded 8 images on Ray (D=192) " in capsys.readouterr().out
        assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
        assert "indexed 8 images (D=192, exact)" in capsys.readouterr().out
        query = folder / embedded.ids[0]
        assert (
            main(["search", "--index", str(tmp_path / "idx"), "--query", str(query), "-k", "3", "--device", "cpu"]) == 0
        )
        lines = capsys.readouterr().out.splitlines()
        rank, score, hit_id, path = lines[0].split()
        assert (rank, hit_id, path) == ("1", embedded.ids[0], str(query)) and float(score) > 0.9999
        assert len(lines) == 4 and lines[3] == f"montage: {query.stem}.neighbours.png"
        assert Image.open(tmp_path / f"{query.stem}.neighbours.png").size == montage_size(3, 160)
        assert main(["search", "--index", str(tmp_path / "missing"), "--query", str(query)]) == 2
        assert "not an `lvd index` folder" in capsys.readouterr().err
