"""ingest: every rejection reason, every odd-but-valid encoding, hashes against full decodes."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from lvd.curation import testdata
from lvd.curation.ingest import BLOB_SCHEMA, INGEST_SCHEMA, IngestConfig, ingest_item, ingest_partition
from lvd.curation.pixels import to_rgb
from lvd.curation.sources import RawItem, plan_partitions

CFG = IngestConfig()


def _ingest_folder(folder: Path, cfg: IngestConfig = CFG) -> dict[str, dict]:
    records = {}
    for part in plan_partitions([str(folder)], files_per_partition=5):
        out = ingest_partition(part, cfg)
        assert out.records.schema == INGEST_SCHEMA and out.blobs.schema == BLOB_SCHEMA
        records.update({Path(r["source"]).name: r for r in out.records.to_pylist()})
    return records


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _full_hashes(data: bytes) -> tuple[int, int]:
    """Reference: full-size decode, EXIF transpose, to RGB, then imagehash as documented."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgb = to_rgb(img)
    return int(str(imagehash.phash(rgb)), 16), int(str(imagehash.dhash(rgb)), 16)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, testdata.write_bad_inputs(folder)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    testdata.write_odd_valid_inputs(folder)
    return folder, testdata.odd_valid_images()


def test_every_file_reachable_rejection_reason(bad):
    folder, expected = bad
    records = _ingest_folder(folder)
    assert {name: r["reason"] for name, r in records.items()} == expected
    assert set(expected.values()) == {"empty", "not_image", "corrupt", "too_small", "too_large", "unsupported_mode"}
    for name, r in records.items():
        assert r["status"] == "rejected" and r["phash"] is None and r["phash256"] is None
        assert r["uid"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert r["nbytes"] == (folder / name).stat().st_size
    assert (records["narrow.png"]["width"], records["narrow.png"]["height"]) == (20, 500)
    assert (records["bomb_soft.png"]["width"], records["bomb_soft.png"]["height"]) == (10_000, 10_000)


def test_item_errors_pass_through_without_uid():
    for reason in ("tar_link", "tar_special", "read_error", "corrupt"):
        record, data = ingest_item(RawItem(source="t.tar::m", data=None, error=reason, meta={"k": 1}), CFG)
        assert data is None and record["status"] == "rejected" and record["reason"] == reason
        assert record["uid"] is None and record["nbytes"] is None and record["meta"] == '{"k": 1}'


def test_hostile_tar_reasons(tmp_path):
    tar = tmp_path / "hostile.tar"
    expected = testdata.write_hostile_tar(tar)
    (part,) = plan_partitions([str(tar)])
    out = ingest_partition(part, CFG)
    got = {r["source"]: r["reason"] or r["status"] for r in out.records.to_pylist()}
    assert got == expected
    assert out.blobs.num_rows == 3


def test_odd_valid_encodings_accepted_with_upright_size_and_hashes(odd):
    folder, images = odd
    records = _ingest_folder(folder)
    assert set(records) == set(images)
    for name, (data, size) in images.items():
        r = records[name]
        assert r["status"] == "accepted" and r["reason"] is None, name
        assert (r["width"], r["height"]) == size, name
        assert to_rgb(ImageOps.exif_transpose(Image.open(folder / name))).mode == "RGB"
        ref_p, ref_d = _full_hashes(data)
        assert _hamming(r["phash"], ref_p) <= 6 and _hamming(r["dhash"], ref_d) <= 8, name


def test_exif_orientation_swaps_size_and_hashes_upright(odd):
    folder, _ = odd
    r = _ingest_folder(folder)["exif6.jpg"]
    stored = Image.open(folder / "exif6.jpg").size
    assert stored == (400, 600) and (r["width"], r["height"]) == (600, 400)
    upright = Image.fromarray(testdata.photo("coffee"))
    assert _hamming(r["phash"], int(str(imagehash.phash(upright)), 16)) <= 6
    sideways = Image.open(folder / "exif6.jpg").convert("RGB")  # pixels as stored, EXIF ignored
    assert _hamming(r["phash"], int(str(imagehash.phash(sideways)), 16)) >= 16


def test_alpha_composited_on_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black: must come out white
    rgba[:32, :, :] = (255, 0, 0, 255)
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[40, 5].tolist() == [255, 255, 255] and out[5, 5].tolist() == [255, 0, 0]
    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(to_rgb(gray16))[0, 0].tolist() == [255, 255, 255]


def test_draft_hash_close_to_full_decode(tmp_path):
    names = testdata.write_photo_jpegs(tmp_path, 16, side=384)
    records = _ingest_folder(tmp_path)
    dists = []
    for name in names:
        full = Image.open(tmp_path / name).convert("RGB")
        dists.append(_hamming(records[name]["phash"], int(str(imagehash.phash(full)), 16)))
        dists.append(_hamming(records[name]["dhash"], int(str(imagehash.dhash(full)), 16)))
    assert max(dists) <= 6 and np.mean(dists) <= 1.5, dists
    phashes = [records[n]["phash"] for n in names]
    assert len(set(phashes)) == len(names)  # distinct photos, distinct hashes


@pytest.mark.parametrize("progressive", [False, True])
def test_draft_decode_still_catches_truncation(progressive):
    buf = io.BytesIO()
    Image.fromarray(testdata.photo("astronaut")).save(buf, "JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    small = Image.open(io.BytesIO(data))
    small.draft("L", (32, 32))
    small.load()
    assert small.size == (64, 64)  # the draft really decoded at 1/8 scale
    for cut in (len(data) // 3, len(data) - 400, len(data) - 2):
        record, kept = ingest_item(RawItem(source="x.jpg", data=data[:cut], error=None, meta={}), CFG)
        assert record["reason"] == "corrupt" and kept is None, cut
    record, kept = ingest_item(RawItem(source="x.jpg", data=data, error=None, meta={}), CFG)
    assert record["status"] == "accepted" and kept == data


def test_duplicate_bytes_share_uid_and_one_blob(tmp_path):
    data = (Path(testdata.__file__).parent / "ingest.py").read_bytes()  # any bytes: uid only
    jpeg = io.BytesIO()
    Image.fromarray(testdata.photo("rocket")).save(jpeg, "JPEG")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(jpeg.getvalue())
    (tmp_path / "c.bin").write_bytes(data)
    (part,) = plan_partitions([str(tmp_path)])
    out = ingest_partition(part, CFG)
    uids = out.records.column("uid").to_pylist()
    assert uids[0] == uids[1] == hashlib.sha256(jpeg.getvalue()).hexdigest()
    assert out.blobs.column("uid").to_pylist() == [uids[0]] and out.blobs.column("data")[0].as_py() == jpeg.getvalue()


def test_limits_are_configurable(odd):
    folder, _ = odd
    tight = _ingest_folder(folder, IngestConfig(max_pixels=300_000, min_side=400))
    assert tight["photo.webp"]["reason"] == "too_large"  # 1000x872
    assert tight["gray.png"]["reason"] == "too_small"  # 384x303
    assert tight["rgba.png"]["status"] == "accepted"  # 640x427


@pytest.mark.parametrize(
    "kwargs, hint",
    [({"min_side": 0}, "min_side"), ({"draft_side": 32}, "draft_side"), ({"hash_size": 16}, "hash_size"), ({"max_pixels": 10}, "max_pixels"),
     ({"max_pixels": 10**12}, "MAX_IMAGE_PIXELS"), ({"formats": ("JPEG", "NOPE")}, "NOPE")],
)  # fmt: skip
def test_config_validation_says_what_to_change(kwargs, hint):
    with pytest.raises(ValueError, match=hint):
        IngestConfig(**kwargs)


def test_hash_bit_order_is_imagehash_hex():
    img = Image.fromarray(testdata.photo("chelsea"))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    record, _ = ingest_item(RawItem(source="c.png", data=buf.getvalue(), error=None, meta={}), CFG)
    ref = imagehash.phash(img)
    assert _hamming(record["phash"], int(str(ref), 16)) <= 4
    reversed_order = int("".join("1" if b else "0" for b in np.asarray(ref.hash).flatten()[::-1]), 2)
    assert _hamming(record["phash"], reversed_order) >= 16  # LSB-first would be far off


def test_phash256_is_imagehash_16_packed_msb_first():
    """phash256 = np.packbits(imagehash.phash(img, 16)) of the reduced decode; hash_bits matches
    imagehash on the very same image within float-vs-8-bit rounding."""
    from lvd.curation.phash import hash_bits

    dists = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        img = Image.fromarray(testdata.photo(name))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        record, _ = ingest_item(RawItem(source=name, data=buf.getvalue(), error=None, meta={}), CFG)
        got = np.unpackbits(np.frombuffer(record["phash256"], np.uint8))
        ref = imagehash.phash(img.convert("L"), hash_size=16).hash.ravel()
        dists.append(int((got != ref).sum()))
        assert (got != ref[::-1]).sum() >= 64  # reversed bit order would be far off
        small = img.convert("L").resize((96, 80))
        p, d, p256 = hash_bits(small, 8)
        assert (p != imagehash.phash(small).hash.ravel()).sum() <= 2
        assert (d != imagehash.dhash(small).hash.ravel()).sum() <= 1
        assert (p256 != imagehash.phash(small, 16).hash.ravel()).sum() <= 4
    assert max(dists) <= 16 and np.mean(dists) <= 8, dists  # vs the full-size decode
    flat_img = Image.new("L", (100, 70), 90)
    flat, _, flat256 = hash_bits(flat_img, 8)  # only DC is above the median, as in imagehash
    assert flat.sum() == flat256.sum() == 1 and flat[0] and flat256[0]
    assert np.array_equal(flat256, imagehash.phash(flat_img, 16).hash.ravel())


def test_ingest_imports_neither_ray_nor_prefect():
    code = "import sys, lvd.curation.ingest; print(sorted({m for m in ('ray', 'prefect') if m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_truncated_odd_encodings_are_corrupt(odd):
    _, images = odd
    for name in ("cmyk.jpg", "gray16.png", "rgba.png", "photo.webp", "photo.bmp", "photo.tif", "progressive.jpg"):
        data = images[name][0]
        record, kept = ingest_item(RawItem(source=name, data=data[: len(data) * 6 // 10], error=None, meta={}), CFG)
        assert (record["reason"], kept) == ("corrupt", None), name


def test_ray_task_gives_the_same_records(ray_local, tmp_path):
    testdata.write_photo_jpegs(tmp_path / "p", 6, side=96)
    testdata.write_bad_inputs(tmp_path / "p" / "bad")
    parts = plan_partitions([str(tmp_path / "p")], files_per_partition=7)
    remote = ray_local.remote(ingest_partition)
    outs = ray_local.get([remote.remote(p, CFG) for p in parts])
    for part, out in zip(parts, outs):
        local = ingest_partition(part, CFG)
        assert out.records.equals(local.records) and out.blobs.equals(local.blobs)


def test_refuses_to_run_with_truncated_loading_enabled(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ingest_item(RawItem(source="x", data=b"x", error=None, meta={}), CFG)
