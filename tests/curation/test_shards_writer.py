"""Shard writer: real photos in, WebDataset tars out; bytes kept, re-encoded, resized, determinism,
atomic writes, manifest, and reading back with the webdataset library."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import webdataset as wds
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images

from lvd.curation.ingest import BLOB_SCHEMA
from lvd.curation.rundir import read_blobs
from lvd.curation.shards import (
    MANIFEST_SCHEMA,
    ShardConfig,
    ShardSample,
    order_samples,
    plan_shards,
    samples_from_table,
    write_manifest,
    write_shard,
    write_shards,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """rocket (427x640 landscape) stored with EXIF orientation 6: displays as 427 wide, 640 tall."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(skimage.data.rocket()), "JPEG", quality=92, exif=exif.tobytes())


def _rgba_png() -> bytes:
    rgba = np.dstack([skimage.data.chelsea(), np.full(skimage.data.chelsea().shape[:2], 128, np.uint8)])
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def photos() -> dict[str, bytes]:
    """name -> encoded bytes; each kind of source the writer must handle."""
    china, flower = load_sample_images().images
    return {
        "astronaut.jpg": _encode(Image.fromarray(skimage.data.astronaut()), "JPEG", quality=90),  # 512x512 RGB
        "camera.jpg": _encode(Image.fromarray(skimage.data.camera()), "JPEG", quality=90),  # 512x512 L
        "rocket_rot6.jpg": _rotated_jpeg(),
        "china.jpg": _encode(Image.fromarray(china).resize((160, 120)), "JPEG", quality=80),  # small
        "coffee.png": _encode(Image.fromarray(skimage.data.coffee()), "PNG"),  # 600x400
        "chelsea_rgba.png": _rgba_png(),  # 451x300 with alpha
        "flower_cmyk.jpg": _encode(Image.fromarray(flower).convert("CMYK"), "JPEG", quality=90),
    }


def make_samples(data: dict[str, bytes] | None = None) -> list[ShardSample]:
    out = []
    for i, (name, raw) in enumerate((data or photos()).items()):
        w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).size
        out.append(
            ShardSample(
                uid=hashlib.sha256(raw).hexdigest(), source=f"/dump/{name}", width=w, height=h, data=raw,
                cluster_ids=(i % 3, i), retrieval={"kind": "sample", "seed": f"seed-{i}", "rank": i},
            )
        )  # fmt: skip
    return out


def read_tars(out: Path) -> dict[str, tuple[bytes, dict]]:
    """uid -> (jpg bytes, json) over every shard, read with tarfile."""
    found = {}
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in files:
            if name.endswith(".json"):
                meta = json.loads(files[name])
                found[meta["uid"]] = (files[name.replace(".json", ".jpg")], meta)
    return found


@pytest.fixture(scope="module")
def samples() -> list[ShardSample]:
    return make_samples()


@pytest.fixture(scope="module")
def written(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(samples, out, ShardConfig(shard_size=3))
    return out, manifest


def test_jpeg_originals_kept_byte_identical_others_reencoded(samples, written):
    out, _ = written
    stored = read_tars(out)
    by_name = {Path(s.source).name: s for s in samples}
    for name in ("astronaut.jpg", "camera.jpg", "rocket_rot6.jpg", "china.jpg"):
        assert stored[by_name[name].uid][0] == by_name[name].data, name
    for name in ("coffee.png", "chelsea_rgba.png", "flower_cmyk.jpg"):
        jpg, meta = stored[by_name[name].uid]
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB" and jpg != by_name[name].data
        assert img.size == (meta["jpg_width"], meta["jpg_height"]) == (meta["width"], meta["height"])
    # re-encoded at quality 95 from the same pixels: close to the PNG original
    coffee = np.asarray(Image.open(io.BytesIO(stored[by_name["coffee.png"].uid][0])), np.float64)
    assert np.abs(coffee - skimage.data.coffee()).mean() < 3.0
    # alpha 128 composited on white: every pixel brightens to (p + 255) / 2
    chelsea = np.asarray(Image.open(io.BytesIO(stored[by_name["chelsea_rgba.png"].uid][0])), np.float64)
    assert np.abs(chelsea - (skimage.data.chelsea() / 2 + 127.5)).mean() < 3.0


def test_json_fields(samples, written):
    out, _ = written
    stored = read_tars(out)
    for s in samples:
        meta = stored[s.uid][1]
        assert meta["uid"] == s.uid and meta["source"] == s.source
        assert (meta["width"], meta["height"]) == (s.width, s.height)
        assert meta["cluster_ids"] == list(s.cluster_ids) and meta["retrieval"] == dict(s.retrieval)
    rot = next(s for s in samples if s.source.endswith("rocket_rot6.jpg"))
    # kept original: stored with its EXIF tag; jpg_* are what a reader sees after exif_transpose
    assert (stored[rot.uid][1]["jpg_width"], stored[rot.uid][1]["jpg_height"]) == (427, 640)
    assert Image.open(io.BytesIO(stored[rot.uid][0])).size == (640, 427)


def test_max_side_respected(samples, tmp_path):
    write_shards(samples, tmp_path, ShardConfig(shard_size=4, max_side=200))
    stored = read_tars(tmp_path)
    for s in samples:
        jpg, meta = stored[s.uid]
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(jpg)))
        assert img.size == (meta["jpg_width"], meta["jpg_height"])
        if max(s.width, s.height) <= 200:  # china.jpg 160x120: small enough, kept as is
            assert jpg == s.data
            continue
        assert max(img.size) == 200 and jpg != s.data
        assert abs(img.size[0] / img.size[1] - s.width / s.height) < 0.01
    rot = next(s for s in samples if s.source.endswith("rocket_rot6.jpg"))
    img = Image.open(io.BytesIO(stored[rot.uid][0]))
    assert img.size == (133, 200) and img.getexif().get(0x0112) is None  # pixels rotated, tag gone
    # the rotation was applied: compare against the reference transpose of the original
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(rot.data))).resize((133, 200), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(img, np.float64) - np.asarray(ref, np.float64)).mean() < 4.0


def test_order_keys_shards_and_manifest(samples, written):
    out, manifest = written
    ordered = sorted(samples, key=lambda s: s.uid)
    assert [i.name for i in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [i.n_samples for i in manifest.shards] == [3, 3, 1] and manifest.n_samples == 7
    table = pq.read_table(out / "manifest.parquet")
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert json.loads(table.schema.metadata[b"lvd.shard_config"])["shard_size"] == 3
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(7)]
    assert [r["uid"] for r in rows] == [s.uid for s in ordered]
    assert [r["source"] for r in rows] == [s.source for s in ordered]
    assert [r["shard"] for r in rows] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3 + ["shard-000002.tar"]
    for info in manifest.shards:
        raw = (out / info.name).read_bytes()
        assert info.sha256 == hashlib.sha256(raw).hexdigest() and info.bytes == len(raw)
        assert {r["shard_sha256"] for r in rows if r["shard"] == info.name} == {info.sha256}
        with tarfile.open(out / info.name) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == [f"{k}.{ext}" for k in info.keys for ext in ("jpg", "json")]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet"] + [i.name for i in manifest.shards]


def test_given_order(samples, tmp_path):
    manifest = write_shards(samples, tmp_path, ShardConfig(shard_size=10, order="given"))
    assert manifest.shards[0].uids == tuple(s.uid for s in samples)


def test_byte_deterministic(samples, written, tmp_path):
    out, manifest = written
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)
    again = write_shards(shuffled, tmp_path, ShardConfig(shard_size=3))
    assert [i.sha256 for i in again.shards] == [i.sha256 for i in manifest.shards]
    for info in manifest.shards:
        assert (tmp_path / info.name).read_bytes() == (out / info.name).read_bytes()
    assert pq.read_table(tmp_path / "manifest.parquet").equals(pq.read_table(out / "manifest.parquet"))


def test_shards_written_independently_match_write_shards(samples, written, tmp_path):
    """What a runner does with one task per shard, finishing in any order."""
    out, manifest = written
    cfg = ShardConfig(shard_size=3)
    ordered = order_samples(reversed(samples), cfg)
    plan = plan_shards(len(ordered), cfg.shard_size)
    infos = [write_shard(i, ordered[r.start : r.stop], tmp_path, cfg) for i, r in reversed(list(enumerate(plan)))]
    assert write_manifest(infos, tmp_path, cfg).shards == manifest.shards
    for name in ["manifest.parquet"] + [i.name for i in manifest.shards]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_failed_shard_leaves_no_final_file_and_keeps_old_one(samples, tmp_path):
    cfg = ShardConfig(shard_size=3)
    bad = ShardSample(uid="f" * 64, source="/dump/garbage.bin", width=1, height=1, data=b"\xff\xd8\xff" + b"\0" * 100)
    with pytest.raises(ValueError, match="garbage.bin"):
        write_shard(1, [samples[0], samples[1], bad], tmp_path, cfg)  # fails after two samples went in
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temp file
    good = write_shard(1, samples[:3], tmp_path, cfg)
    with pytest.raises(ValueError, match="garbage.bin"):
        write_shard(1, [samples[3], bad], tmp_path, cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000001.tar"]
    assert hashlib.sha256((tmp_path / "shard-000001.tar").read_bytes()).hexdigest() == good.sha256
    with pytest.raises(ValueError, match="garbage.bin"):  # write_shards never writes a manifest then
        write_shards(samples + [bad], tmp_path / "run", cfg)
    assert not (tmp_path / "run" / "manifest.parquet").exists()


def test_webdataset_reads_every_sample(samples, written):
    out, manifest = written
    urls = [str(out / i.name) for i in manifest.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(7)]
    assert [s["json"]["uid"] for s in got] == sorted(s.uid for s in samples)
    for s in got:
        img = ImageOps.exif_transpose(s["jpg"])
        assert img.size == (s["json"]["jpg_width"], s["json"]["jpg_height"])


def test_plan_shards_and_config_validation():
    assert plan_shards(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert plan_shards(6, 3) == [range(0, 3), range(3, 6)] and plan_shards(0, 3) == []
    for bad in (dict(shard_size=0), dict(max_side=0), dict(jpeg_quality=101), dict(order="random")):
        with pytest.raises(ValueError):
            ShardConfig(**bad)


def test_bad_inputs_rejected(samples, tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        write_shards([samples[0], samples[0]], tmp_path, ShardConfig())
    with pytest.raises(ValueError, match="samples"):
        write_shard(0, samples[:4], tmp_path, ShardConfig(shard_size=3))
    odd = ShardSample(uid="a", source="s", width=1, height=1, data=samples[3].data, retrieval={"x": {1, 2}})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        write_shard(0, [odd], tmp_path, ShardConfig())
    assert list(tmp_path.iterdir()) == []


def test_samples_from_ingest_blobs(samples, tmp_path):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    for part, chunk in enumerate((samples[:4], samples[4:])):
        blobs = pa.table({"uid": [s.uid for s in chunk], "data": [s.data for s in chunk]}, schema=BLOB_SCHEMA)
        name = f"part-{part:06d}.blobs.parquet"
        pq.write_table(blobs, ingest / name)
        marker = {"index": part, "outputs": {"main": f"part-{part:06d}.parquet", "blobs": name}}
        (ingest / f"part-{part:06d}.done.json").write_text(json.dumps(marker))  # a done partition
    pick = [samples[1], samples[5]]
    blobs = read_blobs(tmp_path, [s.uid for s in pick])
    assert blobs == {s.uid: s.data for s in pick}
    with pytest.raises(KeyError, match="1 uids"):
        read_blobs(tmp_path, [samples[0].uid, "0" * 64])
    assert read_blobs(tmp_path, [samples[0].uid, "0" * 64], strict=False) == {samples[0].uid: samples[0].data}
    table = pa.table(
        {
            "uid": [s.uid for s in pick], "source": [s.source for s in pick],
            "width": [s.width for s in pick], "height": [s.height for s in pick],
            "data": [blobs[s.uid] for s in pick], "cluster_ids": [list(s.cluster_ids) for s in pick],
            "retrieval": [json.dumps(dict(s.retrieval)) for s in pick],
        }
    )  # fmt: skip
    assert samples_from_table(table) == pick
    with pytest.raises(ValueError, match="data"):
        samples_from_table(table.drop_columns(["data"]))
