"""Pool hygiene end to end through the Prefect flow `curate` on local Ray: an img2dataset-style
dump (images + `.json` sidecars with urls) mixing the packages' photos (faces included), junk
made from them, a blocked domain, a capped domain and images a test-built NSFW model flags."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from prefect_runs import run_artifacts

from lvd.curation import ledger as lg
from lvd.curation.faces import FaceConfig, blur_region, detect_faces
from lvd.curation.pixels import to_rgb

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import hygiene as bench  # noqa: E402  -- the benchmark's photo sets: one definition of "clean photos"

CAP = 3
THRESHOLD = 0.5


class RedFlagger(torch.nn.Module):
    """The test's NSFW model: flags images whose red channel dominates."""

    def forward(self, x):
        return 40 * (x[:, 0].mean((1, 2)) - x[:, 1:].mean((1, 2, 3))) - 20


def model_flags(data: bytes) -> bool:
    """What the model says about one image, computed here, outside the pipeline."""
    x = (
        np.asarray(
            ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            .convert("RGB")
            .resize((224, 224), Image.Resampling.BILINEAR),
            np.float32,
        )
        / 255
    )
    logit = float(RedFlagger()(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())))
    return 1 / (1 + np.exp(-logit)) >= THRESHOLD


def lfw_faces(n: int) -> list[np.ndarray]:
    import skimage.data

    return [
        np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC))
        for a in skimage.data.lfw_subset()[:n]
    ]


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene")
    folder = root / "dump"
    folder.mkdir()
    clean = [bench.photo(p) for p in bench.PHOTOS] + bench.crops(40, seed=3) + lfw_faces(6)
    rng = np.random.default_rng(0)
    photos = [bench.photo(p) for p in ("astronaut", "coffee", "rocket", "chelsea")]
    junk = {
        "near_constant": [np.full((200, 300, 3), c, np.uint8) for c in ((120, 40, 200), (250, 250, 250))],
        "too_blurry": [
            np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(max(p.shape[:2]) / 25))) for p in photos[1:]
        ],
        "extreme_aspect": [np.asarray(Image.fromarray(p).resize((800, 40))) for p in photos[:3]],
    }
    red = [np.clip(rng.normal(0, 40, (120, 160, 3)) + (200, 30, 30), 0, 255).astype(np.uint8) for _ in range(3)]
    blocked = [np.asarray(Image.fromarray(p).rotate(90 * (i + 1))) for i, p in enumerate(photos[1:])]
    capped = bench.crops(5, seed=11)
    groups = {
        "clean": clean,
        **{f"junk_{k}": v for k, v in junk.items()},
        "red": red,
        "blocked": blocked,
        "capped": capped,
    }
    kinds, i = {}, 0
    for kind, arrs in groups.items():
        for a in arrs:
            name = folder / f"{i:05d}.jpg"
            name.write_bytes(bench.jpeg(a))
            host = {"blocked": "img.blocked.example", "capped": "capped.example"}.get(kind, f"site{i}.example")
            name.with_suffix(".json").write_text(json.dumps({"url": f"https://{host}/{i}.jpg", "key": f"{i:05d}"}))
            kinds[str(name)] = kind
            i += 1
    (root / "block.txt").write_text("# domains we never train on\nblocked.example\n")
    model = root / "red.pt"
    torch.jit.script(RedFlagger()).save(str(model))
    return folder, root, kinds, model


@pytest.fixture(scope="module")
def run_state(ray_local, prefect_harness, dump, tmp_path_factory):
    from lvd.flows.curate import curate

    folder, root, _, model = dump
    out = tmp_path_factory.mktemp("run")
    hygiene = {
        "url_blocklist": str(root / "block.txt"),
        "max_per_domain": CAP,
        "quality": {},
        "faces": {},
        "nsfw": {"model": str(model), "threshold": THRESHOLD},
    }
    state = curate(
        inputs=[str(folder)], out=str(out), partition_size=16, copy_detection=False, hygiene=hygiene, return_state=True
    )
    return state, out


@pytest.fixture(scope="module")
def run(run_state):
    state, out = run_state
    return state.result(), out


def rows(out) -> dict[str, dict]:
    return {r["source"]: r for r in lg.read_ledger(out).to_pylist()}


def test_verify_passes_and_summary_names_each_stage(run):
    summary, out = run
    assert summary.ok, summary.problems
    assert lg.verify_run(out).ok
    text = "\n".join(summary.hygiene)
    assert "nsfw filter: on (red.pt, threshold 0.5)" in text and "face blurring: on" in text
    assert f"domain cap: {CAP} images per domain: domain_capped 2" in text


def test_junk_rejected_with_its_reason(run, dump):
    _, out = run
    led = rows(out)
    for source, kind in dump[2].items():
        if kind.startswith("junk_"):
            assert (led[source]["status"], led[source]["reason"]) == ("rejected", kind[len("junk_") :]), source
            assert json.loads(led[source]["detail"])["metric"] == kind[len("junk_") :]


def test_blocked_domain_rejected_naming_the_rule(run, dump):
    _, out = run
    led = rows(out)
    blocked = [s for s, k in dump[2].items() if k == "blocked"]
    assert blocked and all(led[s]["reason"] == "url_blocked" for s in blocked)
    assert {json.loads(led[s]["detail"])["rule"] for s in blocked} == {"blocklist: blocked.example"}
    assert [s for s, r in led.items() if r["reason"] == "url_blocked"] == blocked


def test_domain_cap_keeps_the_first_n_by_uid(run, dump):
    _, out = run
    led = rows(out)
    capped = sorted((led[s]["uid"], s) for s, k in dump[2].items() if k == "capped")
    assert [led[s]["status"] for _, s in capped[:CAP]] == ["sharded"] * CAP
    assert [led[s]["reason"] for _, s in capped[CAP:]] == ["domain_capped"] * (len(capped) - CAP)
    assert json.loads(led[capped[-1][1]]["detail"])["rule"] == f"max_per_domain={CAP}: capped.example"


def test_clean_photos_lose_at_most_two_percent_to_the_quality_filters(run, dump):
    _, out = run
    led = rows(out)
    clean = [s for s, k in dump[2].items() if k == "clean"]
    lost = [s for s in clean if led[s]["reason"] in ("near_constant", "extreme_aspect", "too_blurry", "mostly_border")]
    assert len(clean) == 64 and len(lost) / len(clean) <= 0.02, [(s, led[s]["reason"]) for s in lost]


def test_nsfw_rejects_what_the_model_flags_and_nothing_else(run, dump):
    _, out = run
    led = rows(out)
    reached = [
        s
        for s, r in led.items()
        if r["reason"] not in ("url_blocked", "near_constant", "too_blurry", "extreme_aspect", "mostly_border")
    ]
    flagged = {s for s in reached if model_flags(Path(s).read_bytes())}
    assert {s for s, k in dump[2].items() if k == "red"} <= flagged  # it flags the red images (and a red crop)
    assert {s for s, r in led.items() if r["reason"] == "nsfw"} == flagged


def shard_samples(out) -> dict[str, tuple[dict, bytes]]:
    """source -> (JSON, JPEG bytes) of every sharded sample."""
    found = {}
    for tar_path in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in files.items():
            if name.endswith(".json"):
                meta = json.loads(payload)
                found[meta["source"]] = (meta, files[name[:-5] + ".jpg"])
    return found


def test_faces_blurred_in_the_shards_and_nothing_else(run, dump):
    _, out = run
    led, samples = rows(out), shard_samples(out)
    with_faces = {s: v for s, v in samples.items() if v[0].get("faces")}
    astronaut = [s for s, k in dump[2].items() if k == "clean"][0]
    assert astronaut in with_faces and len(with_faces) >= 5  # astronaut and the LFW faces
    for source, (meta, jpg) in samples.items():
        decoded = to_rgb(ImageOps.exif_transpose(Image.open(source)))
        boxes = [tuple(b) for b in meta.get("faces", [])]
        assert json.loads(led[source]["detail"]).get("faces", []) == [list(b) for b in boxes]
        assert meta.get("faces_blurred", 0) == len(boxes)
        if max(decoded.size) <= FaceConfig().detect_side:  # the detector sees these at full size
            assert len(boxes) == len(detect_faces(decoded, FaceConfig())), source  # every face it finds
        if not boxes:
            assert jpg == Path(source).read_bytes()  # no face: the original bytes, untouched
            continue
        stored = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
        ref = io.BytesIO()
        decoded.save(ref, "JPEG", quality=95, subsampling=0)  # the same pixels stored without blurring
        unblurred = np.asarray(Image.open(ref).convert("RGB")).astype(int)
        mask = np.zeros(stored.shape[:2], bool)
        for b in boxes:
            x, y, w, h = blur_region(b, decoded.size)
            mask[y : y + h, x : x + w] = True
        assert np.array_equal(stored[~mask], unblurred[~mask]), source  # the rest: byte-for-byte
        assert np.abs(stored[mask] - unblurred[mask]).mean() > 3, source  # the face region changed


def test_table_and_gallery_artifacts(run_state, run):
    from lvd.curation import hygiene
    from lvd.curation.shards.image import store_image
    from lvd.flows.artifacts import thumbnail_png

    _, out = run
    keys = ["curate-hygiene-counts", "curate-hygiene-gallery"]
    latest = run_artifacts(run_state[0].state_details.flow_run_id, keys)
    assert set(latest) == set(keys)
    table = {r["reason"]: r["inputs"] for r in json.loads(latest["curate-hygiene-counts"].data)}
    reasons = [r["reason"] for r in rows(out).values()]
    per_reason = {k: v for k, v in table.items() if not k.startswith("images")}
    assert per_reason == {r: reasons.count(r) for r in hygiene.REASONS}
    assert table["url_blocked"] == 3 and table["domain_capped"] == 2 and table["nsfw"] >= 3
    gallery = latest["curate-hygiene-gallery"].data
    for reason in ("url_blocked", "near_constant", "too_blurry", "extreme_aspect", "nsfw", "domain_capped"):
        assert f"| {reason} | ![" in gallery, reason
    samples = shard_samples(out)
    meta, _ = samples[min(s for s, v in samples.items() if v[0].get("faces"))]  # the first shown
    raw = Path(meta["source"]).read_bytes()
    blurred = thumbnail_png(store_image(raw, max_side=512, quality=90, faces=[tuple(b) for b in meta["faces"]]).data)
    assert blurred in gallery and thumbnail_png(raw) not in gallery  # shown blurred, never as taken
