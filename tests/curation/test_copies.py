"""Real photos and their transformed copies: what each kind of copy actually is."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos


@pytest.fixture(scope="module")
def photos():
    return real_photos(crops=True)


def test_real_photos_are_distinct_real_images(photos):
    names = [n for n, _ in photos]
    assert len(names) == len(set(names)) >= 25
    assert {"astronaut", "coffee", "china", "flower", "motorcycle_left", "retina_q3"} <= set(names)
    for name, img in photos:
        assert img.mode in ("RGB", "L"), name
        assert min(img.size) >= 64, name
    arrays = {n: np.asarray(img.convert("L").resize((32, 32))) for n, img in photos}
    assert len({a.tobytes() for a in arrays.values()}) == len(arrays)


def test_copy_kinds(photos):
    name, img = photos[0]
    w, h = img.size
    copies = make_copies(img, seed=3)
    assert tuple(copies) == COPY_KINDS
    assert copies["exact"] == encode_original(img)
    assert make_copies(img, seed=3) == copies  # deterministic
    decoded = {k: Image.open(io.BytesIO(v)) for k, v in copies.items()}
    rw, rh = decoded["resized"].size
    assert 0.5 * w - 1 <= rw <= 0.8 * w + 1 and abs(rw / w - rh / h) < 0.01
    cw, ch = decoded["cropped"].size
    assert 0.95 * w - 1 <= cw <= 0.98 * w + 1 and 0.95 * h - 1 <= ch <= 0.98 * h + 1
    assert decoded["recompressed"].format == "JPEG" and len(copies["recompressed"]) < len(copies["exact"])
    assert decoded["reencoded"].format == "WEBP"  # odd seed
    assert Image.open(io.BytesIO(make_copies(img, seed=2)["reencoded"])).format == "PNG"
    bright = np.asarray(decoded["brightened"].convert("L"), float).mean()
    orig = np.asarray(decoded["exact"].convert("L"), float).mean()
    assert 1.05 < bright / orig < 1.25


def test_fashion_mnist_upscaled_and_distinct():
    imgs = fashion_mnist(50, size=64, seed=1)
    assert len(imgs) == 50 and all(i.size == (64, 64) and i.mode == "RGB" for i in imgs)
    assert len({i.tobytes() for i in imgs}) == 50
    with pytest.raises(ValueError, match="size >= 32"):
        fashion_mnist(5, size=28)


# ---------------------------------------------------------------- copy-detection benchmark

from itertools import combinations  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import ImageEnhance  # noqa: E402

from lvd.curation import copies as cp  # noqa: E402
from lvd.curation.ingest import IngestConfig, ingest_item  # noqa: E402
from lvd.curation.sources import RawItem  # noqa: E402
from lvd.datasets import load_fashion_mnist  # noqa: E402


@pytest.fixture(scope="module")
def catalog():
    return cp.bench_catalog(0)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, cp.write_bench_dump(root)


def _inter(a, b) -> int:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def _area(b) -> int:
    return (b[2] - b[0]) * (b[3] - b[1])


def _gray(data_or_img) -> np.ndarray:
    img = data_or_img if isinstance(data_or_img, Image.Image) else Image.open(io.BytesIO(data_or_img))
    return np.asarray(img.convert("L"), np.float64)


def test_bench_catalog_groups_sizes_and_order(catalog):
    names = [o.name for o in catalog]
    assert len(names) == len(set(names)) == 213
    counts = {g: sum(o.group == g for o in catalog) for g in cp.BENCH_GROUPS}
    assert counts == {"photo": 10, "tile": 93, "burst": 10, "product": 60, "face": 40}
    assert [n for n, _ in cp.bench_originals(0)] == names
    assert {o.group for o in catalog[:5]} == set(cp.BENCH_GROUPS)  # round robin: any prefix mixes groups
    for o in catalog:
        assert min(o.image.size) >= 64 and o.image.mode in ("RGB", "L"), o.name
        if o.group == "tile":
            assert min(o.image.size) >= 160, o.name
    # several products per class, on a white background
    products = [o for o in catalog if o.group == "product"]
    assert all(sum(p.label == q.label for q in products) >= 5 for p in products)
    border = [np.concatenate([a[:2].ravel(), a[-2:].ravel(), a[:, :2].ravel(), a[:, -2:].ravel()]).mean()
              for a in (np.asarray(p.image.convert("L")) for p in products)]  # fmt: skip
    assert np.median(border) > 240 and min(border) > 120


def test_bench_originals_never_share_pixels(catalog):
    """Checked from the construction: every original is its recorded box of its source (pixel
    for pixel), a whole photo is its source's only original, tiles of a photo are disjoint,
    burst partners overlap by 0 < overlap <= 40% and neither contains the other."""
    sources = dict(real_photos())
    by_source: dict[str, list] = {}
    for o in catalog:
        by_source.setdefault(o.source, []).append(o)
        if o.group in ("photo", "tile", "burst"):
            src = sources[o.source]
            assert src.size == o.source_size
            expect = src.crop(o.box)
            if o.group == "burst":
                assert 0.92 <= o.brightness <= 1.08
                expect = ImageEnhance.Brightness(expect).enhance(o.brightness)
            else:
                assert o.brightness == 1.0
            assert np.array_equal(np.asarray(o.image), np.asarray(expect)), o.name
    assert "cat" not in by_source  # cat is chelsea
    for src, items in by_source.items():
        groups = {o.group for o in items}
        assert len(groups) == 1, (src, groups)  # a photo is whole, tiled or burst: never two
        group = groups.pop()
        if group == "photo":
            assert len(items) == 1 and items[0].box == (0, 0, *items[0].source_size)
        elif group == "tile":
            assert all(_inter(a.box, b.box) == 0 for a, b in combinations(items, 2)), src
        elif group == "burst":
            assert len(items) == 2
            a, b = (o.box for o in items)
            overlap = _inter(a, b)
            assert 0 < overlap <= 0.4 * min(_area(a), _area(b)), src
        else:  # product / face: one original per dataset image
            assert len(items) == 1
    # products and faces: no two picks are near-duplicates in their own source pixels
    fm, _ = load_fashion_mnist("test")
    import skimage.data

    lfw = skimage.data.lfw_subset()[:100] * 255
    for group, pixels in (("product", fm), ("face", lfw)):
        idx = [int(o.source.rsplit(":", 1)[1]) for o in catalog if o.group == group]
        for i, j in combinations(idx, 2):
            assert np.abs(pixels[i].astype(float) - pixels[j]).mean() >= 8, (group, i, j)
    # and no two originals look the same at 16x16 (the whole set is distinct images)
    small = {o.name: np.asarray(o.image.convert("L").resize((16, 16), Image.Resampling.BOX), float) for o in catalog}
    flat = np.stack(list(small.values())).reshape(len(small), -1)
    d = np.abs(flat[:, None] - flat[None]).mean(-1) + np.eye(len(flat)) * 1e9
    assert d.min() > 1.0


def test_bench_dump_deterministic_and_stable(tmp_path, dump):
    root, truth = dump
    a = cp.write_bench_dump(tmp_path / "a", n_copied=3, kinds=("overlay", "crop40", "reencoded"))
    b = cp.write_bench_dump(tmp_path / "b", n_copied=3, kinds=("overlay", "crop40", "reencoded"))
    assert a == b
    written = {str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert written == set(a.files) | {"truth.json"}
    assert len([f for f in a.files.values() if f["kind"] not in ("original", "broken")]) == 9
    for rel in a.files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
        # a subset of kinds/originals draws what the full dump drew
        assert (tmp_path / "a" / rel).read_bytes() == (root / rel).read_bytes(), rel
    assert (tmp_path / "a" / "truth.json").read_text() == (tmp_path / "b" / "truth.json").read_text()
    assert cp.BenchTruth.load(root) == truth
    other = cp.bench_catalog(1)
    assert [o.name for o in other] != [o.name for o in cp.bench_catalog(0)]
    with pytest.raises(ValueError, match="unknown copy kinds"):
        cp.write_bench_dump(tmp_path / "c", kinds=("rotated",))


def test_bench_dump_layout_and_counts(dump, catalog):
    root, truth = dump
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(truth.files) | {"truth.json"}
    assert truth.kinds == cp.BENCH_KINDS and set(truth.originals) == {o.name for o in catalog}
    counts = truth.counts()
    for o in catalog:
        assert truth.originals[o.name]["box"] == list(o.box) and truth.originals[o.name]["group"] == o.group
        assert set(truth.copies_of(o.name)) == {"original", *cp.BENCH_KINDS}
    assert counts["broken"] == {"broken": 4}
    assert sum(sum(c.values()) for c in counts.values()) == 213 * 12 + 4
    for rel, f in truth.files.items():
        if f["kind"] == "original":
            ext = ".png" if f["group"] in ("product", "face") else ".jpg"
            assert rel.startswith("originals/") and rel.endswith(ext)
        elif f["kind"] != "broken":
            assert rel.startswith(f"copies/{f['original']}__{f['kind']}.")
            assert f["group"] == truth.originals[f["original"]]["group"]


def test_bench_kinds_stay_in_their_documented_ranges(dump):
    root, truth = dump
    seen = dict.fromkeys(cp.BENCH_KINDS, 0)
    flip_wins = []
    for rel, f in truth.files.items():
        kind = f["kind"]
        if kind in ("original", "broken"):
            continue
        seen[kind] += 1
        p, o = f["params"], truth.originals[f["original"]]
        data, orig = (root / rel).read_bytes(), (root / o["file"]).read_bytes()
        img = Image.open(io.BytesIO(data))
        w, h = o["size"]
        g, g0 = _gray(data), _gray(orig)
        if kind == "exact":
            assert data == orig
        elif kind == "resized":
            assert 0.4 <= p["scale"] <= 0.8 and img.size == (round(w * p["scale"]), round(h * p["scale"]))
        elif kind == "recompressed":
            assert 25 <= p["quality"] <= 60 and img.format == "JPEG" and img.size == (w, h)
        elif kind == "reencoded":
            assert data != orig and img.format == p["format"] and img.size == (w, h)
            assert np.abs(g - g0).mean() < 6
        elif kind in ("brightened", "contrast"):
            assert 0.6 <= p["factor"] <= 0.8 or 1.2 <= p["factor"] <= 1.5
            assert img.size == (w, h)
            stat = (lambda x: x.mean()) if kind == "brightened" else (lambda x: x.std())
            assert (stat(g) > stat(g0)) == (p["factor"] > 1), (rel, stat(g), stat(g0))
        elif kind in ("crop8", "crop40"):
            lo, hi = (0.895, 0.945) if kind == "crop8" else (0.555, 0.645)  # ranges +- pixel rounding
            box = p["box"]
            frac = _area(box) / (w * h)
            assert lo <= frac <= hi and abs(frac - p["area_frac"]) < 1e-9, (rel, frac)
            assert img.size == (box[2] - box[0], box[3] - box[1])
            assert np.abs(g - g0[box[1] : box[3], box[0] : box[2]]).mean() < 6  # the pixels of that box
            if kind == "crop40":
                assert 0.9 <= p["aspect"] <= 1.1
        elif kind == "flipped":
            assert img.format == "JPEG" and p["quality"] == 90 and img.size == (w, h)
            err = np.abs(g - g0[:, ::-1]).mean()
            assert err < 6, rel
            flip_wins.append(err < 0.5 * np.abs(g - g0).mean())  # not the unmirrored image
        elif kind == "overlay":
            box = p["box"]
            frac = _area(box) / (w * h)
            assert 0.095 <= frac <= 0.255 and p["variant"] in ("banner", "sticker"), (rel, frac)
            assert p.get("donor") in (None, "logo", "colorwheel", "checkerboard", "horse")
            assert img.size == (w, h)
            mask = np.zeros((h, w), bool)
            mask[box[1] : box[3], box[0] : box[2]] = True
            diff = np.abs(g - g0)
            assert diff[~mask].mean() < 6, rel  # untouched outside the box
            assert diff[mask].mean() > 3 * diff[~mask].mean() + 1, rel  # covered inside it
        elif kind == "combined":
            assert 0.5 <= p["scale"] <= 0.8 and 35 <= p["quality"] <= 70 and img.format == "JPEG"
            assert 0.75 <= p["factor"] <= 0.9 or 1.1 <= p["factor"] <= 1.3
            assert img.size == (round(w * p["scale"]), round(h * p["scale"]))
    assert seen == dict.fromkeys(cp.BENCH_KINDS, 213)
    assert np.mean(flip_wins) > 0.9  # symmetric products/faces may look alike either way
    # both sides of the two-sided ranges and both variants/codecs occur
    params = [f["params"] for f in truth.files.values() if f["kind"] != "broken"]
    kinds = [f["kind"] for f in truth.files.values() if f["kind"] != "broken"]
    assert {p["format"] for p, k in zip(params, kinds) if k == "reencoded"} == {"PNG", "WEBP"}
    assert {p["variant"] for p, k in zip(params, kinds) if k == "overlay"} == {"banner", "sticker"}
    assert {p["factor"] > 1 for p, k in zip(params, kinds) if k == "brightened"} == {True, False}


def test_bench_ingest_accepts_every_image_and_rejects_broken_files(dump):
    root, truth = dump
    cfg = IngestConfig()
    for rel, f in truth.files.items():
        record, kept = ingest_item(RawItem(source=rel, data=(root / rel).read_bytes(), error=None), cfg)
        if f["kind"] == "broken":
            assert record["status"] == "rejected" and record["reason"] == f["reason"], rel
            assert kept is None
        else:
            assert record["status"] == "accepted", (rel, record["reason"])
    assert {f["reason"] for f in truth.files.values() if f["kind"] == "broken"} == {"corrupt", "empty", "not_image"}


def test_split_sets_and_write_bench_sets(dump, tmp_path):
    root, truth = dump
    seeds, evals = cp.split_sets(truth, n_seeds=12, n_eval=6, seed=0)
    assert len(seeds) == 12 and len(evals) == 6 and not set(seeds) & set(evals)
    assert all(truth.originals[n]["group"] in ("photo", "tile") for n in seeds + evals)
    assert (seeds, evals) == cp.split_sets(truth, n_seeds=12, n_eval=6, seed=0)
    assert (seeds, evals) != cp.split_sets(truth, n_seeds=12, n_eval=6, seed=1)
    got = cp.write_bench_sets(root, truth, tmp_path / "seeds", tmp_path / "eval")
    assert got == (seeds, evals)
    for names, d in ((seeds, tmp_path / "seeds"), (evals, tmp_path / "eval")):
        assert sorted(p.name for p in d.iterdir()) == sorted(Path(truth.originals[n]["file"]).name for n in names)
        for n in names:
            rel = truth.originals[n]["file"]
            assert (d / Path(rel).name).read_bytes() == (root / rel).read_bytes()
            assert (root / rel).exists() and len(truth.copies_of(n)) == 1 + len(cp.BENCH_KINDS)  # pool keeps them
    # only originals that have copies are eligible
    small = cp.write_bench_dump(tmp_path / "small", n_copied=40)
    copied = {f["original"] for f in small.files.values() if f["kind"] not in ("original", "broken")}
    s, e = cp.split_sets(small, n_seeds=3, n_eval=2)
    assert set(s + e) <= copied
    with pytest.raises(ValueError, match="copied photo/tile originals"):
        cp.split_sets(small, n_seeds=30, n_eval=30)
