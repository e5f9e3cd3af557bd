"""The copy detector on real photos it was not tuned on (scikit-image / scikit-learn images,
the benchmark dump's look-alike groups): verification, containment, candidates, chain
splitting, calibration, the guard, the hash channels for strong brightness changes, and a
TorchScript copy model. No Ray: `fanout.parallel_map` runs in-process here."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from _images import jpeg, png
from _models import TinyDescriptor
from PIL import Image, ImageEnhance

from lvd.curation import copies
from lvd.curation import copydetect as cd
from lvd.curation import localfeat as lf
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.guard import MassRemovalError, check_removal
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.sources import RawItem

VCFG = lf.VerifyConfig()


@pytest.fixture(scope="module")
def catalog():
    return {o.name: o for o in copies.bench_catalog(0)}


def _bytes(img: Image.Image | bytes) -> bytes:
    if isinstance(img, bytes):
        return img
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _feat(img) -> lf.Features:
    return lf.features(_bytes(img))


def _score(a, b) -> int:
    return lf.verify(_feat(a), _feat(b)).score(VCFG)


@pytest.fixture(scope="module")
def photos(catalog):
    return [catalog[n] for n in ("astronaut", "camera", "coins", "chelsea")]


@pytest.mark.parametrize("kind", ["crop40", "flipped", "overlay", "combined"])
def test_verification_links_copies_of_real_photos(photos, kind):
    for o in photos:
        data, params = copies.make_bench_copy(o, kind)
        assert _score(o.image, data) >= cd.MIN_INLIERS, (o.name, kind, params)


def test_burst_neighbours_and_distinct_photos_are_not_linked(catalog):
    """Two windows of one scene overlapping by <= 40% share many keypoints under one shift
    (flower: 45 distinct inlier places): only the frame-containment rule keeps them apart."""
    bursts = sorted(n for n, o in catalog.items() if o.group == "burst")
    verdicts = [lf.verify(_feat(catalog[a].image), _feat(catalog[b].image)) for a, b in zip(bursts[::2], bursts[1::2])]
    assert max(v.inliers for v in verdicts) > 3 * cd.MIN_INLIERS  # the geometry alone would link one
    assert all(v.score(VCFG) < cd.MIN_INLIERS for v in verdicts), verdicts
    names = ["astronaut", "camera", "coins", "chelsea", "clock", "page"]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert _score(catalog[a].image, catalog[b].image) < cd.MIN_INLIERS, (a, b)


def test_mirrored_matching_finds_flips_only_through_the_mirror(catalog):
    o = catalog["astronaut"]
    flipped, _ = copies.make_bench_copy(o, "flipped")
    fa, fb = _feat(o.image), _feat(flipped)
    v = lf.verify(fa, fb)
    assert v.flipped and v.score(VCFG) >= cd.MIN_INLIERS
    # no mirror features on either side (verify may take the pair in either order)
    direct_a, direct_b = (lf.Features(f.kp, f.desc, f.kp, f.desc, f.size) for f in (fa, fb))
    assert lf.verify(direct_a, direct_b).score(VCFG) < cd.MIN_INLIERS


def test_verify_is_symmetric(catalog):
    """Lowe's test and RANSAC depend on which image comes first; verify takes every pair in
    one order, so pool pairs, calibration pairs and eval-pool pairs decide alike."""
    o = catalog["camera"]
    items = [o.image] + [copies.make_bench_copy(o, k)[0] for k in ("crop40", "overlay", "flipped", "combined")]
    items += [catalog["coins"].image]
    feats = [_feat(x) for x in items]
    asymmetric = 0
    for i, fa in enumerate(feats):
        for fb in feats[i + 1 :]:
            assert lf.verify(fa, fb) == lf.verify(fb, fa)
            one_way = lf._verify_one(fa.kp, fa.desc, fa.size, fb.kp, fb.desc, fb.size, VCFG, False)
            other = lf._verify_one(fb.kp, fb.desc, fb.size, fa.kp, fa.desc, fa.size, VCFG, False)
            asymmetric += one_way.inliers != other.inliers
    assert asymmetric  # the order does matter underneath


def test_look_alike_detail_is_one_piece_of_evidence(catalog):
    """Two distinct pairs of trousers (white-background product shots) match on one small
    patch, mirrored, with its corners found at several ORB scales: many RANSAC inliers in one
    place. Counting inliers once per place, and asking that they spread over the overlap,
    each refuse the pair alone; the raw inlier count would link it."""
    fa = _feat(catalog["product_trouser_05802"].image)
    fb = _feat(catalog["product_trouser_07763"].image)
    raw = lf.VerifyConfig(inlier_cell=0, min_spread=0)
    assert lf.verify(fa, fb, raw).score(raw) >= cd.MIN_INLIERS
    for alone in (lf.VerifyConfig(min_spread=0), lf.VerifyConfig(inlier_cell=0)):
        assert lf.verify(fa, fb, alone).score(alone) < cd.MIN_INLIERS, alone
    assert lf.distinct_places(np.array([[0, 0], [1, 1], [5.9, 0], [6, 0], [13, 20]], np.float32), 6) == 3


def test_overlay_copies_keep_keypoints_off_the_sticker(catalog):
    """A checkerboard sticker has the strongest corners of the image: ORB's own budget, taken
    before the grid spreads keypoints, must leave the rest of the photo enough of them that
    the copy's inliers spread over it, not only around one detail."""
    o = catalog["chelsea"]
    data, params = copies.make_bench_copy(o, "overlay")
    v = lf.verify(_feat(o.image), _feat(data))
    assert v.score(VCFG) >= 2 * cd.MIN_INLIERS and v.spread >= 0.15, (v, params)


def test_containment_of_frames():
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    assert lf.containment(ident, (100, 80), (100, 80)) == pytest.approx((1.0, 1.0))
    # A is a 60 x 80 crop of B (100 x 80) placed at x = 20: contained, keeps 60%
    crop = np.array([[1.0, 0, 20], [0, 1.0, 0]])
    assert lf.containment(crop, (60, 80), (100, 80)) == pytest.approx((1.0, 0.6), abs=1e-3)
    # panned by half a frame: each lies half inside the other
    pan = np.array([[1.0, 0, 50], [0, 1.0, 0]])
    assert lf.containment(pan, (100, 80), (100, 80)) == pytest.approx((0.5, 0.5), abs=1e-3)


def test_split_chains_breaks_a_chain_and_keeps_a_star():
    # rows by rank: 0 (best), 1, 2, 3. Edges 0-1, 1-2, 2-3: a chain; only 0~1 and 2~3 are
    # really copies of each other
    truly = {(0, 1), (2, 3)}
    linked = lambda i, j: (min(i, j), max(i, j)) in truly  # noqa: E731
    a, b = np.array([0, 1, 2]), np.array([1, 2, 3])
    s = cd.split_chains(4, a, b, np.arange(4), linked, max_centres=8)
    pairs = {(min(x, y), max(x, y)) for x, y in zip(s.edges_a.tolist(), s.edges_b.tolist())}
    assert pairs == {(0, 1), (2, 3)} and s.components_split == 1
    # a star (every member a copy of row 0) stays one group, with no extra checks
    star = cd.split_chains(4, np.array([1, 2, 3]), np.array([0, 0, 0]), np.arange(4), lambda i, j: False, 8)
    assert len(star.edges_a) == 3 and set(star.edges_b.tolist()) == {0} and star.extra_checks == 0
    # rows of one hash group (1 and 3, linked by their hash edge) move as a unit led by 1: 0
    # joins it through its own link with the leader, 2 through its decided link with the
    # member 3 (a version of the same image: a crop need not match the group's q25 leader)
    grouped = cd.split_chains(
        4, np.array([0, 3, 1]), np.array([1, 2, 3]), np.arange(4), linked, 8, group=np.array([0, 1, 2, 1])
    )
    comp = {(min(x, y), max(x, y)) for x, y in zip(grouped.edges_a.tolist(), grouped.edges_b.tolist())}
    assert comp == {(1, 3), (0, 1), (1, 2)}
    # ... but a unit tied to the centre only through another unit stays apart: units {0, 1}
    # (the centre), {2} (linked with the member 1: joins) and {3} (linked with 2 alone)
    chain = cd.split_chains(
        4, np.array([0, 1, 2]), np.array([1, 2, 3]), np.arange(4), lambda i, j: False, 8, group=np.array([0, 0, 2, 3])
    )
    pairs = {(min(x, y), max(x, y)) for x, y in zip(chain.edges_a.tolist(), chain.edges_b.tolist())}
    assert pairs == {(0, 1), (0, 2)} and chain.components_split == 1
    # one leader takes part in every join: units {0, 1} and {2, 3} tied only member to member
    # (1 ~ 3) stay apart
    apart = cd.split_chains(
        4, np.array([0, 2, 1]), np.array([1, 3, 3]), np.arange(4), lambda i, j: False, 8, group=np.array([0, 0, 2, 2])
    )
    assert apart.components_split == 1 and len(apart.edges_a) == 2


def test_ratio_matches_are_opencvs_knn_match_and_ratio_test(catalog):
    """The Faiss popcount matcher against OpenCV's BFMatcher (the reference it replaces), on
    real photos and their copies: the same (query, train) pairs pass Lowe's test."""
    import cv2

    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    o = catalog["astronaut"]
    imgs = [o.image, copies.make_bench_copy(o, "crop40")[0], catalog["camera"].image, catalog["coins"].image]
    feats = [_feat(x) for x in imgs]
    for fa in feats:
        for fb in feats:
            for db in (fb.desc, fb.desc_flip):
                ref = sorted(
                    (m[0].queryIdx, m[0].trainIdx)
                    for m in bf.knnMatch(fa.desc, db, k=2)
                    if len(m) == 2 and m[0].distance < 0.8 * m[1].distance
                )
                ia, ib = lf.ratio_matches(fa.desc, db, 0.8)
                assert sorted(zip(ia.tolist(), ib.tolist())) == ref


def test_the_threshold_gate_decides_as_the_full_fit(catalog):
    """With `enough` (the run's threshold), pairs whose ratio matches cannot reach it are not
    fitted: every pair links or not exactly as with the full verification."""
    names = ["astronaut", "camera", "coins", "chelsea", "clock"]
    items = [catalog[n].image for n in names] + [
        copies.make_bench_copy(catalog[n], k)[0] for n in names[:3] for k in ("crop40", "overlay", "flipped")
    ]
    feats = [_feat(x) for x in items]
    for fa in feats:
        for fb in feats:
            full = lf.verify(fa, fb).score(VCFG)
            for t in {cd.MIN_INLIERS, 40, max(full, 3)}:  # the pair's own score: the tightest gate
                assert (lf.verify(fa, fb, enough=t).score(VCFG) >= t) == (full >= t), (full, t)


def test_sorted_unique_and_lsh_keys_match_their_references():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 40, 5000) % 500_009
    assert np.array_equal(cd.sorted_unique(x), np.unique(x)) and len(cd.sorted_unique(x[:0])) == 0
    x = (x % 977) * 300  # repeats, to count; beyond 16 bits
    ref = np.unique(x, return_counts=True)
    for bound in (500_009, 1 << 40):  # int32 and int64 sorts
        got = cd._counted(x, bound)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    desc = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    pos = rng.permutation(256)[:64].reshape(4, 16)
    bits = np.unpackbits(desc, axis=1)[:, pos]  # [m, 4, 16], bit p of unpackbits order
    ref = (bits * (1 << np.arange(16))).sum(axis=2) + (np.arange(4) << 16)
    assert np.array_equal(cd.lsh_keys(desc, pos, chunk=7), ref)


def test_copy_stage_workers_import_no_torch():
    """Ray workers unpickle the copy stages' functions and units from lvd.curation.stages.copy:
    importing it must not pull in torch (seconds of CPU in every worker)."""
    import subprocess
    import sys

    code = "import sys, lvd.curation.stages.copy, lvd.curation.copydetect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_choose_threshold_links_at_most_the_rate():
    distinct = list(range(10)) + [15]
    copies_ = {"k": [20, 30, 40]}
    assert cd.choose_threshold(cd.METHOD_LOCAL, copies_, distinct, 0.0) == 16  # above the 15
    assert cd.choose_threshold(cd.METHOD_LOCAL, copies_, distinct, 0.1) == cd.MIN_INLIERS  # the 15 allowed
    t = cd.choose_threshold(cd.METHOD_MODEL, {"k": [0.9, 0.95]}, [0.1, 0.5], 0.0)
    assert t == pytest.approx(0.7)
    with pytest.raises(cd.CopyModelUnfit, match="cannot tell copies apart"):
        cd.choose_threshold(cd.METHOD_MODEL, {"k": [0.4]}, [0.1, 0.5], 0.0)


def test_calibration_on_real_photos(catalog):
    """Known copies of real photos (not the benchmark's kinds) are found; disjoint parts of one
    photo are not linked; a user threshold is reported with its own recall."""
    imgs = [
        catalog[n].image
        for n in ("astronaut", "coffee_b0", "camera", "chelsea", "coins", "hubble_deep_field_r1c1")
        if n in catalog
    ][:5]
    blobs = [_bytes(i) for i in imgs]
    pairs, distinct = cd.calibration_pairs(blobs, seed=0)

    def score(ps):
        return [lf.verify(_feat(x), _feat(y)).score(VCFG) for x, y in ps]

    copy_scores = {k: score(v) for k, v in pairs.items()}
    cal = cd.calibrate(cd.METHOD_LOCAL, copy_scores, score(distinct), cd.CopyDetectConfig(), images=len(blobs))
    assert cal.source == "calibrated" and cal.threshold >= cd.MIN_INLIERS
    assert cal.copy_recall >= 0.85 and cal.false_links <= 1, cal.summary()
    user = cd.calibrate(cd.METHOD_LOCAL, copy_scores, score(distinct), cd.CopyDetectConfig(threshold=1000), images=5)
    assert user.source == "user" and user.copy_recall == 0.0 and "user" in user.summary()


def test_calibration_copies_of_a_part_keep_every_distinct_pair(catalog):
    """Known copies of the first `copies_of` sampled images only (the recall report), distinct
    pairs of all of them (the model-free threshold reads only those): the same pairs as in full."""
    blobs = [_bytes(catalog[n].image) for n in ("astronaut", "camera", "chelsea") if n in catalog]
    full_copies, full_distinct = cd.calibration_pairs(blobs, seed=0)
    part_copies, part_distinct = cd.calibration_pairs(blobs, seed=0, copies_of=2)
    assert part_distinct == full_distinct
    assert part_copies == {k: v[:2] for k, v in full_copies.items()} and all(len(v) == 2 for v in part_copies.values())


def test_calibration_parts_of_mirror_symmetric_products_are_distinct():
    """A shirt's left half is its right half mirrored: a flipped copy, which the detector
    rightly links (the first product here scores 26 that way). Calibration's distinct pairs
    are therefore split top from bottom: no part pair of these products links, so the
    threshold stays at the floor whatever products the sample draws (with left / right halves
    one such product set it at 27; on a product dump it ranged 15-33 over sampling seeds)."""
    prods = copies.fashion_mnist(48, size=112, seed=3, split="test")
    w, h = prods[0].size
    mirrored = [_score(p.crop((0, 0, w // 2, h)), p.crop((w - w // 2, 0, w, h))) for p in prods]
    assert max(mirrored) >= 2 * cd.MIN_INLIERS  # the hazard is in this data
    _, distinct = cd.calibration_pairs([png(p) for p in prods], seed=0, copies_of=0)
    scores = [lf.verify(_feat(x), _feat(y)).score(VCFG) for x, y in distinct]
    assert len(scores) == 4 * len(prods) and max(scores) < cd.MIN_INLIERS, sorted(scores)[-5:]
    assert cd.choose_threshold(cd.METHOD_LOCAL, {}, scores, 0.005) == cd.MIN_INLIERS


def test_inliers_count_in_source_pixels_so_look_alike_products_stay_apart():
    """200 product shots of 28 px upscaled to 112 px: an upscaled image's corners a few feature
    pixels apart are one source pixel. Counted in source pixels no two distinct products link;
    in feature pixels two look-alike pairs did (12 and 14 inliers: two plain long-sleeve tops,
    two dresses), merging distinct originals on an untuned dump. Their crops still link."""
    from dataclasses import replace

    prods = copies.fashion_mnist(7200, size=112, seed=3, split="train")[7000:7200]
    feats = [lf.local_features(png(p)) for p in prods]
    assert feats[0].up == pytest.approx(256 / 112)
    n = len(feats)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    source = max(lf.verify(feats[i], feats[j]).score(VCFG) for i, j in pairs)
    assert source < cd.MIN_INLIERS
    flat = [replace(f, up=1.0) for f in feats]  # counted in feature pixels
    linked = sum(lf.verify(flat[i], flat[j]).score(VCFG) >= cd.MIN_INLIERS for i, j in pairs)
    assert linked >= 2
    rng = np.random.default_rng(0)
    crops = 0
    for p, f in zip(prods[:40], feats):
        cw = ch = round(112 * 0.8)  # keeps 64% of the image
        x0, y0 = (int(v) for v in rng.integers(0, 112 - cw + 1, 2))
        crops += (
            lf.verify(f, lf.local_features(jpeg(p.crop((x0, y0, x0 + cw, y0 + ch)), 90))).score(VCFG) >= cd.MIN_INLIERS
        )
    assert crops >= 34, crops


def test_candidates_propose_crops_flips_and_overlays(catalog):
    names = [n for n, o in catalog.items() if o.group in ("tile", "photo")][:40]
    items = [(n, catalog[n].image) for n in names]
    kinds = ("crop40", "overlay", "flipped")
    items += [(f"{n}:{k}", copies.make_bench_copy(catalog[n], k)[0]) for n in names[:10] for k in kinds]
    rows = [lf.features_row(n, _bytes(x)) for n, x in items]
    feats = [lf.Features.from_row(r) for r in rows]
    ids = cd.descriptor_candidates(feats, 8)
    pos = {n: i for i, (n, _) in enumerate(items)}
    found = [pos[n.split(":")[0]] in ids[pos[n]].tolist() for n, _ in items if ":" in n]
    assert np.mean(found) >= 0.9, found
    nh = np.stack([np.frombuffer(r["nhash"], np.uint8) for r in rows])
    nf = np.stack([np.frombuffer(r["nhash_flip"], np.uint8) for r in rows])
    aspect = np.log([r["fw"] / r["fh"] for r in rows])
    a, b = cd.mirror_hash_pairs(nh, nf, 20, aspect, 1.1)
    flips = {(min(pos[n], pos[f"{n}:flipped"]), max(pos[n], pos[f"{n}:flipped"])) for n in names[:10]}
    got = set(zip(a.tolist(), b.tolist()))
    assert len(flips & got) >= 8 and got <= flips  # flips found, and nothing else


def test_guard_names_stage_fraction_and_flag():
    check_removal("copy detection", 9, 10, 0.9)  # at the limit: fine
    with pytest.raises(MassRemovalError) as e:
        check_removal("decontamination", 6, 10, 0.5, largest=[["a", "b"]])
    msg = str(e.value)
    assert "decontamination would remove 6 of 10 images (60.0%)" in msg and "--max-remove-fraction" in msg
    import pickle

    again = pickle.loads(pickle.dumps(e.value))  # crosses Ray intact
    assert again.largest == [["a", "b"]] and str(again) == msg


def _hash_row(uid: str, data: bytes) -> dict:
    rec, _ = ingest_item(RawItem(uid, data, None), IngestConfig())
    assert rec["status"] == "accepted"
    return {**rec, "uid": uid}


@pytest.mark.parametrize("factor", [0.65, 1.4])
def test_hash_channels_find_strong_brightness_changes(factor):
    """Clipping brightness changes move pHash-256 and the thumbnail fit; the equalised and
    clipping-aware channels find them, without merging the distinct photos."""
    rows = []
    for name, img in copies.real_photos():
        rows.append(_hash_row(f"{name}:orig", copies.encode_original(img)))
        rows.append(_hash_row(f"{name}:b", _bytes(ImageEnhance.Brightness(img.convert("RGB")).enhance(factor))))
    table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA).drop_columns(["source", "status", "reason", "meta"])

    def found(cfg):
        d = find_near_duplicates(table, cfg)
        rep = dict(zip(d["uid"].to_pylist(), d["duplicate_of"].to_pylist()))
        origs = [r["uid"] for r in rows if r["uid"].endswith(":orig")]
        reps = [rep.get(u, u) for u in origs]
        assert len(set(reps)) == len(reps)  # no two photos merged
        return np.mean([rep.get(u.replace(":orig", ":b"), u.replace(":orig", ":b")) == rep.get(u, u) for u in origs])

    with_channels = found(DedupConfig())
    # the soft channel (JPEG'd soft images) also finds some darkened copies: off in the
    # comparisons, so they measure the two brightness channels
    without = found(DedupConfig(equalised_radius=None, clipped_verify_radius=None, soft_max_residual=None))
    assert with_channels >= 0.95 and with_channels > without, (with_channels, without)
    clipped_only = found(DedupConfig(equalised_radius=None, soft_max_residual=None))  # each finds some alone
    equalised_only = found(DedupConfig(clipped_verify_radius=None, soft_max_residual=None))
    assert equalised_only > without, (equalised_only, without)
    if factor > 1:  # brightening clips the highlights: the clipping-aware channel's case
        assert clipped_only > without, (clipped_only, without)


def test_torchscript_copy_model_loads_and_embeds(tmp_path, catalog):
    from lvd.curation.embed import EmbedConfig, Embedder, is_torchscript

    torch.manual_seed(0)
    path = tmp_path / "sscd_like.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    assert is_torchscript(path) and not is_torchscript(tmp_path)
    emb = Embedder(str(path), EmbedConfig(resize=64, crop=64, batch_size=4, decode_threads=1))
    assert emb.dim == 8 * 16
    v = emb.embed_images([_bytes(catalog["astronaut"].image), _bytes(catalog["camera"].image)]).astype(np.float32)
    assert v.shape == (2, 128) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-2)


def test_a_model_that_cannot_separate_copies_is_refused():
    # a copy model mapping everything to one direction: copies and distinct pairs all at 1.0
    with pytest.raises(cd.CopyModelUnfit):
        cd.calibrate(cd.METHOD_MODEL, {"resized": [1.0, 1.0]}, [1.0, 1.0, 1.0], cd.CopyDetectConfig(), images=2)


def test_copy_model_calibration_scores_are_each_pairs_cosine(tmp_path, catalog):
    """The copy model's calibration embeds each distinct image once and scores a pair by the
    cosine of its two images' vectors: equal to embedding the pair's two images on their own."""
    from lvd.curation.embed import EmbedConfig, Embedder
    from lvd.curation.stages.copy import model_scores

    torch.manual_seed(0)
    path = tmp_path / "sscd_like.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    emb = Embedder(str(path), EmbedConfig(resize=64, crop=64, batch_size=4, decode_threads=1))
    names = sorted(catalog)[:6]
    copies_, distinct = cd.calibration_pairs([_bytes(catalog[n].image) for n in names], seed=0)
    copy_scores, distinct_scores = model_scores(emb, copies_, distinct)

    def cosine(x: bytes, y: bytes) -> float:
        va, vb = emb.embed_images([x]).astype(np.float32), emb.embed_images([y]).astype(np.float32)
        return float(va[0] @ vb[0])

    assert set(copy_scores) == set(copies_) and len(distinct_scores) == len(distinct) > 0
    for kind, pairs in copies_.items():
        assert len(copy_scores[kind]) == len(pairs) == len(names)
        np.testing.assert_allclose(copy_scores[kind], [cosine(x, y) for x, y in pairs], atol=2e-3, err_msg=kind)
    np.testing.assert_allclose(distinct_scores, [cosine(x, y) for x, y in distinct], atol=2e-3)
    assert np.std(distinct_scores) > 1e-3  # the pairs' scores differ: not one constant
