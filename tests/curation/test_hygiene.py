"""Pool hygiene without Ray or Prefect: quality filters, URL rules and the domain cap, face
detection and blurring, the NSFW interface, and their hooks in ingest."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFilter

from lvd.curation import hygiene as hy
from lvd.curation import nsfw, rundir, urlfilter
from lvd.curation.faces import FaceConfig, blur_faces, blur_region, detect_faces, scale_boxes
from lvd.curation.ingest import IngestConfig, ingest_item
from lvd.curation.sources import RawItem
from lvd.curation.testdata import photo


def jpeg(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def ingest(data: bytes, hygiene: dict | None, meta: dict | None = None) -> dict:
    return ingest_item(RawItem(source="x.jpg", data=data, error=None, meta=meta or {}), IngestConfig(hygiene=hygiene))[
        0
    ]


# ---------------------------------------------------------------- quality filters


def test_laplacian_variance_against_a_loop():
    x = np.random.default_rng(0).integers(0, 255, (9, 7)).astype(np.float64)
    lap = [
        x[i - 1, j] + x[i + 1, j] + x[i, j - 1] + x[i, j + 1] - 4 * x[i, j] for i in range(1, 8) for j in range(1, 6)
    ]
    assert hy.laplacian_var(x) == pytest.approx(np.var(lap))
    assert hy.sharpness(x) == pytest.approx(np.var(lap) / x.var())
    assert hy.sharpness(np.full((8, 8), 7.0)) == 0.0


def test_border_fraction_hand_computed():
    x = np.full((100, 100), 250.0)
    x[20:80, 10:90] = np.random.default_rng(1).integers(0, 200, (60, 80))
    assert hy.border_fraction(x, 10) == pytest.approx(1 - 60 * 80 / 100**2)
    assert hy.border_fraction(np.random.default_rng(2).integers(0, 255, (50, 40)).astype(float), 10) == 0.0


@pytest.mark.parametrize("reason", ["near_constant", "extreme_aspect", "too_blurry", "mostly_border"])
def test_each_filter_rejects_its_junk_and_can_be_turned_off(reason):
    a = photo("coffee")
    junk = {
        "near_constant": np.full((200, 300, 3), (30, 140, 90), np.uint8),
        "extreme_aspect": np.asarray(Image.fromarray(a).resize((900, 45))),
        "too_blurry": np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(24))),
        "mostly_border": np.pad(
            np.asarray(Image.fromarray(a).resize((90, 60))), ((150, 150), (180, 180), (0, 0)), constant_values=255
        ),
    }[reason]
    rec = ingest(jpeg(junk), {"quality": {}})
    assert (rec["status"], rec["reason"]) == ("rejected", reason)
    assert json.loads(rec["detail"])["metric"] == reason
    field = {
        "near_constant": "min_contrast",
        "extreme_aspect": "max_aspect",
        "too_blurry": "min_sharpness",
        "mostly_border": "max_border",
    }[reason]
    assert ingest(jpeg(junk), {"quality": {field: None}})["reason"] != reason
    assert ingest(jpeg(junk), None)["status"] == "accepted"  # no hygiene: ingest as before


def test_package_photos_pass_the_quality_filters():
    for name in ("astronaut", "camera", "coins", "moon", "hubble_deep_field", "retina", "china", "flower"):
        rec = ingest(jpeg(photo(name)), {"quality": {}})
        assert rec["status"] == "accepted" and rec["detail"] is None, name


def test_quality_config_refuses_bad_values():
    with pytest.raises(ValueError, match="max_aspect"):
        hy.QualityConfig(max_aspect=0.5)
    with pytest.raises(ValueError, match="min_contrast"):
        hy.QualityConfig(min_contrast=-1)


# ---------------------------------------------------------------- URL rules and the domain cap


def test_rules_file_and_matching(tmp_path):
    f = tmp_path / "rules.txt"
    f.write_text("# comment\nExample.COM\n*://*/nsfw/*   # a path pattern\nre:\\.ru/\n\n")
    rules = urlfilter.read_rules(f)
    assert rules == ("example.com", "*://*/nsfw/*", "re:\\.ru/")
    block = lambda url: urlfilter.check_url({"json": {"url": url}}, rules, ())  # noqa: E731
    assert block("https://img.example.com/a.jpg").rule == "blocklist: example.com"
    assert block("https://www.example.com/a.jpg").rule == "blocklist: example.com"
    assert block("https://notexample.com/a.jpg") is None
    assert block("http://x.org/nsfw/1.jpg").rule == "blocklist: *://*/nsfw/*"
    assert block("http://x.ru/1.jpg").rule == "blocklist: re:\\.ru/"
    f.write_text("re:(unclosed\n")
    with pytest.raises(ValueError, match="rules.txt:1: bad regular expression"):
        urlfilter.read_rules(f)


def test_allowlist_and_where_urls_come_from():
    allow = ("good.org",)
    assert urlfilter.check_url({"url": "https://good.org/1.jpg"}, (), allow) is None  # parquet url column
    verdict = urlfilter.check_url({"json": {"url": "https://bad.org/1.jpg"}}, (), allow)
    assert verdict.rule == "allowlist: no rule matched"
    assert urlfilter.check_url({}, (), allow).rule == "allowlist: no url"
    assert urlfilter.check_url({}, ("bad.org",), ()) is None  # no url: the blocklist has nothing to match
    assert urlfilter.check_url({"json": "not json"}, ("bad.org",), ()) is None


def test_url_blocked_before_decoding():
    rec = ingest(b"\xff\xd8\xff garbage", {"url_block": ("bad.org",)}, {"json": {"url": "https://a.bad.org/x"}})
    assert (rec["reason"], json.loads(rec["detail"])) == (
        "url_blocked",
        {"rule": "blocklist: bad.org", "url": "https://a.bad.org/x"},
    )


def test_domain_cap_keeps_first_n_uids_per_domain():
    pairs = [
        (u, f"https://{d}/{u}")
        for u, d in [("e", "a.com"), ("b", "a.com"), ("d", "www.a.com"), ("a", "b.com"), ("c", "a.com"), ("b", "a.com")]
    ]
    assert urlfilter.cap_domains(pairs, 2) == {"d": "max_per_domain=2: a.com", "e": "max_per_domain=2: a.com"}
    # a uid over the cap in one domain stays when another domain keeps it
    assert urlfilter.cap_domains(pairs + [("e", "https://c.com/e")], 2) == {"d": "max_per_domain=2: a.com"}


def test_cap_applies_to_every_ingest_read(tmp_path):
    meta = lambda d: json.dumps({"json": {"url": f"https://{d}/x"}})  # noqa: E731
    records = pa.table(
        {
            "source": ["s1", "s2", "s3", "s4"],
            "status": ["accepted", "accepted", "rejected", "accepted"],
            "reason": [None, None, "corrupt", None],
            "uid": ["u2", "u1", None, "u3"],
            "meta": [meta("a.com"), meta("a.com"), meta("a.com"), "{}"],
            "detail": [None] * 4,
        }
    )
    capped = urlfilter.capped_table(records, 1)
    assert capped.to_pylist() == [{"source": "s1", "uid": "u2", "rule": "max_per_domain=1: a.com"}]
    path = rundir.cap_path(tmp_path)
    path.parent.mkdir()
    pq.write_table(capped, path)
    out = rundir.apply_caps(tmp_path, records).to_pydict()
    assert out["status"] == ["rejected", "accepted", "rejected", "accepted"]
    assert out["reason"] == ["domain_capped", None, "corrupt", None]
    assert json.loads(out["detail"][0]) == {"rule": "max_per_domain=1: a.com"}


# ---------------------------------------------------------------- faces


def test_astronaut_face_found_by_the_bundled_and_a_plugged_in_cascade():
    import cv2

    img = Image.fromarray(photo("astronaut"))
    other = f"{cv2.data.haarcascades}haarcascade_frontalface_default.xml"
    for cfg in (FaceConfig(), FaceConfig(detector=other)):
        ((x, y, w, h),) = detect_faces(img, cfg)
        assert 150 < x + w / 2 < 260 and 60 < y + h / 2 < 170 and 60 < w < 140  # Eileen Collins' face
    assert len(FaceConfig(detector=other).detector_sha256) == 64
    assert detect_faces(Image.fromarray(photo("coffee")), FaceConfig()) == []


def test_face_detector_file_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        FaceConfig(detector=str(tmp_path / "none.xml"))
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="cannot load it as a cascade"):
        detect_faces(Image.new("L", (64, 64)), FaceConfig(detector=str(bad)))


def test_blur_changes_only_whole_blocks_around_the_box():
    rgb = Image.fromarray(photo("astronaut"))
    box = (177, 67, 95, 95)
    x, y, w, h = blur_region(box, rgb.size)
    assert (x % 8, y % 8, w % 8, h % 8) == (0, 0, 0, 0) and x <= 177 - 14 and x + w >= 177 + 95 + 14
    out, a = np.asarray(blur_faces(rgb, [box])).astype(int), np.asarray(rgb).astype(int)
    mask = np.zeros(a.shape[:2], bool)
    mask[y : y + h, x : x + w] = True
    assert np.array_equal(out[~mask], a[~mask]) and np.abs(out[mask] - a[mask]).mean() > 10
    assert scale_boxes([(10, 20, 30, 40)], (100, 200), (50, 100)) == [(5, 10, 15, 20)]


def test_ingest_records_faces_in_oriented_full_size_coordinates():
    a = photo("astronaut")
    upright = json.loads(ingest(jpeg(a), {"faces": {}})["detail"])["faces"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: readers turn it back upright
    rotated = json.loads(ingest(jpeg(np.rot90(a, 1).copy(), exif=exif.tobytes()), {"faces": {}})["detail"])["faces"]
    assert len(upright) == 1 and np.allclose(rotated, upright, atol=6)
    # a large image is seen by the detector at detect_side (640): boxes come back at full size
    big_jpeg = jpeg(np.asarray(Image.fromarray(a).resize((1280, 1280))))
    big = json.loads(ingest(big_jpeg, {"faces": {}})["detail"])["faces"]
    assert len(big) == 1 and np.allclose(big, np.asarray(upright) * 2.5, atol=12)


# ---------------------------------------------------------------- NSFW


class RedFlagger(torch.nn.Module):
    def forward(self, x):
        return 40 * (x[:, 0].mean((1, 2)) - x[:, 1:].mean((1, 2, 3))) - 20


@pytest.fixture(scope="module")
def red_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("nsfw") / "red.pt"
    torch.jit.script(RedFlagger()).save(str(path))
    return str(path)


def test_nsfw_rejects_what_the_model_flags(red_model):
    red = np.clip(np.random.default_rng(0).normal(0, 30, (80, 80, 3)) + (210, 30, 30), 0, 255).astype(np.uint8)
    cfg = {"nsfw": {"model": red_model, "threshold": 0.5}}
    rec = ingest(jpeg(red), cfg)
    assert rec["reason"] == "nsfw" and json.loads(rec["detail"])["nsfw"] > 0.5
    for name in ("astronaut", "coffee", "rocket"):
        rec = ingest(jpeg(photo(name)), cfg)
        assert rec["status"] == "accepted" and json.loads(rec["detail"])["nsfw"] < 0.5
    # the threshold is the cut: a pinkish image (score ~0.12) passes at 0.5 and goes at 0.1
    pink = jpeg(np.clip(np.random.default_rng(1).normal(0, 5, (80, 80, 3)) + (178, 64, 64), 0, 255).astype(np.uint8))
    score = json.loads(ingest(pink, cfg)["detail"])["nsfw"]
    assert 0.1 < score < 0.5 and ingest(pink, cfg)["status"] == "accepted"
    assert ingest(pink, {"nsfw": {"model": red_model, "threshold": 0.1}})["reason"] == "nsfw"


# An ONNX file written by hand (protobuf wire format): no onnx package is installed to export one.


def _varint(n: int) -> bytes:
    out = b""
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _f(field: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(field << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _tensor_type(dims) -> bytes:
    shape = b"".join(_f(1, _f(1, d) if isinstance(d, int) else _f(2, d)) for d in dims)
    return _f(1, _f(1, 1) + _f(2, shape))  # TypeProto.tensor_type: elem FLOAT, shape


def red_flagger_onnx() -> bytes:
    """logit = mean over H, W of a 1x1 convolution with weights (40, -20, -20), plus b = -20:
    40 * (mean R - mean of G and B) - 20, the TorchScript test model's function."""
    w = struct.pack("<3f", 40.0, -20.0, -20.0)
    init_w = _f(1, 1) + _f(1, 3) + _f(1, 1) + _f(1, 1) + _f(2, 1) + _f(8, "w") + _f(9, w)  # 1 x 3 x 1 x 1
    init_b = _f(2, 1) + _f(8, "b") + _f(9, struct.pack("<f", -20.0))
    mul = _f(1, "x") + _f(1, "w") + _f(2, "xw") + _f(3, "conv") + _f(4, "Conv")
    axes = _f(1, "axes") + b"".join(_f(8, a) for a in (1, 2, 3)) + _f(20, 7)
    keep = _f(1, "keepdims") + _f(3, 0) + _f(20, 2)
    mean = _f(1, "xw") + _f(2, "m") + _f(3, "mean") + _f(4, "ReduceMean") + _f(5, axes) + _f(5, keep)
    add = _f(1, "m") + _f(1, "b") + _f(2, "logit") + _f(3, "add") + _f(4, "Add")
    graph = (
        _f(1, mul)
        + _f(1, mean)
        + _f(1, add)
        + _f(2, "red")
        + _f(5, init_w)
        + _f(5, init_b)
        + _f(11, _f(1, "x") + _f(2, _tensor_type([1, 3, 224, 224])))
        + _f(12, _f(1, "logit") + _f(2, _tensor_type([1])))
    )
    return _f(1, 7) + _f(2, "lvd-test") + _f(7, graph) + _f(8, _f(1, "") + _f(2, 13))


def test_nsfw_onnx_model_scores_like_the_torchscript_one(tmp_path, red_model):
    path = tmp_path / "red.onnx"
    path.write_bytes(red_flagger_onnx())
    red = np.clip(np.random.default_rng(3).normal(0, 30, (80, 80, 3)) + (210, 30, 30), 0, 255).astype(np.uint8)
    for data in (jpeg(red), jpeg(photo("astronaut")), jpeg(photo("coffee"))):
        by_onnx = ingest(data, {"nsfw": {"model": str(path)}})
        by_script = ingest(data, {"nsfw": {"model": red_model}})
        assert by_onnx["reason"] == by_script["reason"]
        onnx_score, script_score = (json.loads(r["detail"])["nsfw"] for r in (by_onnx, by_script))
        assert onnx_score == pytest.approx(script_score, abs=1e-3)
    assert ingest(jpeg(red), {"nsfw": {"model": str(path)}})["reason"] == "nsfw"


def test_nsfw_off_without_a_model_and_bad_models_refused(tmp_path, red_model):
    from lvd.flows.curate_tasks import _hygiene_lines

    assert nsfw.summary(None) == "nsfw filter: off (no model)"
    lines = _hygiene_lines(None, None, {}, 0, [])
    assert "nsfw filter: off (no model)" in lines and "quality filters: off" in lines
    assert nsfw.summary(nsfw.NsfwConfig(model=red_model, threshold=0.7)) == "nsfw filter: on (red.pt, threshold 0.7)"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="does not score a test image"):
        hy.from_options({"nsfw": {"model": str(junk)}})
    with pytest.raises(ValueError, match="threshold"):
        nsfw.NsfwConfig(model=red_model, threshold=1.5)


def test_options_from_plain_json(tmp_path):
    (tmp_path / "b.txt").write_text("bad.org\n")
    cfg, cap = hy.from_options({"url_blocklist": str(tmp_path / "b.txt"), "max_per_domain": 5, "quality": {}})
    assert cfg.url_block == ("bad.org",) and cap == 5 and cfg.quality == hy.QualityConfig() and cfg.faces is None
    assert hy.from_options(None) == (None, None)
    with pytest.raises(ValueError, match="unknown"):
        hy.from_options({"blur": True})


def test_cli_options_become_the_flow_parameter(tmp_path):
    import argparse

    from lvd.cli.options import add_hygiene_options, hygiene_kwargs, hygiene_problems

    p = argparse.ArgumentParser()
    add_hygiene_options(p)
    assert hygiene_kwargs(p.parse_args([])) == {}
    args = p.parse_args(
        ["--quality", "max_aspect=4", "--quality", "max_border=off", "--blur-faces", "--max-per-domain", "2"]
    )
    assert hygiene_kwargs(args) == {
        "hygiene": {"quality": {"max_aspect": 4.0, "max_border": None}, "faces": {}, "max_per_domain": 2}
    }
    assert hygiene_problems(p.parse_args(["--quality", "sharp=1"]))[0].startswith("--quality sharp=1: use NAME=VALUE")
    assert hygiene_problems(p.parse_args(["--max-per-domain", "0"])) == ["--max-per-domain 0: use at least 1"]
    assert "cannot read it" in hygiene_problems(p.parse_args(["--url-blocklist", str(tmp_path / "none.txt")]))[0]
