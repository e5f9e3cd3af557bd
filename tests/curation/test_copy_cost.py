"""The copy detector's cost work decides exactly as before: each speedup (cheaper keypoint
handling, packed features for verification tasks, one round of calibration tasks that
describes each image once, features found once per uid, verification that stops once a score
provably stays below the threshold) is checked against the plain computation it replaced, on
real images (scikit-image)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from lvd.curation import copydetect as cd
from lvd.curation import localfeat as lf
from lvd.curation.stages import copy as stages_copy

CFG = cd.CopyDetectConfig()


def _jpeg(a: np.ndarray, q: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "astronaut": _jpeg(skimage.data.astronaut()),
        "chelsea": _jpeg(skimage.data.chelsea()),  # not square: grid cells by x and y differ
        "camera": _png(skimage.data.camera()),
        "coins64": _png(skimage.data.coins()[100:164, 150:214]),  # upscaled to the feature side
    }


def _detect_plain(orb, gray: np.ndarray) -> tuple[tuple, tuple]:
    """`localfeat._detect` as it was written before the keypoint speedups: each keypoint's
    place and response read in Python (`k.pt`, `k.response`), not by cv2.KeyPoint_convert."""
    import cv2

    detector, clahe, n = orb
    gray = clahe.apply(gray)
    kps = detector.detect(gray, None)
    h, w = gray.shape
    xy = np.array([k.pt for k in kps], np.float32)
    response = np.array([k.response for k in kps], np.float32)
    grid = lf._GRID
    cell = np.minimum(grid - 1, (xy[:, 1] * grid / h).astype(int)) * grid + np.minimum(
        grid - 1, (xy[:, 0] * grid / w).astype(int)
    )
    order = np.lexsort((-response, cell))
    rank_in_cell = np.arange(len(order)) - np.searchsorted(cell[order], cell[order])
    per_cell = max(1, n // (2 * grid * grid))
    first, rest = order[rank_in_cell < per_cell], order[rank_in_cell >= per_cell]
    pick = np.concatenate(
        [first[np.argsort(-response[first], kind="stable")], rest[np.argsort(-response[rest], kind="stable")]]
    )[:n]
    keep, desc = detector.compute(gray, [kps[i] for i in pick.tolist()])
    mirrored = [
        cv2.KeyPoint(w - 1 - k.pt[0], k.pt[1], k.size, (180.0 - k.angle) % 360.0, k.response, k.octave, k.class_id)
        for k in keep
    ]
    keep_m, desc_m = detector.compute(np.ascontiguousarray(gray[:, ::-1]), mirrored)
    return (np.array([k.pt for k in keep], np.float32), desc), (np.array([k.pt for k in keep_m], np.float32), desc_m)


def test_features_are_the_reference_features(images):
    """features_row's keypoints and descriptors (both orientations) are those of the plain
    per-keypoint computation, on this machine (ORB's corners and the descriptors' bits move
    with the CPU's SIMD paths, so digests pinned on one machine failed on another). The
    keypoint budget: 300 for the photos (the coins crop finds fewer)."""
    cfg = lf.FeatureConfig()
    for name, data in images.items():
        row = lf.features_row("", data, cfg)
        gray, _, _ = lf.feature_images(data, cfg.side)
        (kp, desc), (kp_f, desc_f) = _detect_plain(lf._orb(cfg), gray)
        got = {f: np.frombuffer(row[f], t) for f, t in (("kp", np.float32), ("desc", np.uint8),
                                                        ("kp_flip", np.float32), ("desc_flip", np.uint8))}  # fmt: skip
        for f, want in (("kp", kp), ("desc", desc), ("kp_flip", kp_f), ("desc_flip", desc_f)):
            assert np.array_equal(got[f], want.ravel()), (name, f)
        assert (row["fw"], row["fh"]) == (gray.shape[1], gray.shape[0]) and max(gray.shape) == cfg.side
        assert len(kp) == len(kp_f) and (len(kp) == cfg.n_features or name == "coins64"), (name, len(kp))
    # feature pixels per source pixel: 1 for the photos (scaled down), 4 for the 64 px crop
    rows = {k: lf.features_row("", d) for k, d in images.items()}
    assert {k: r["up"] for k, r in rows.items()} == {"astronaut": 1.0, "chelsea": 1.0, "camera": 1.0, "coins64": 4.0}


def test_local_features_are_the_features_local_part(images):
    """Calibration describes its images by `local_features` (no global descriptor, no hashes)."""
    for data in images.values():
        full, local = lf.features(data), lf.local_features(data)
        for x, y in ((full.kp, local.kp), (full.desc, local.desc), (full.kp_flip, local.kp_flip)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert np.array_equal(full.desc_flip, local.desc_flip) and full.size == local.size


def _photo_features() -> list[lf.Features]:
    """Real photos and copies of them (crop, mirror, recompression): links and non-links."""
    out = []
    for a in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        h, w = a.shape[:2]
        for data in (_jpeg(a), _jpeg(a[h // 5 :, : 4 * w // 5]), _jpeg(a[:, ::-1]), _jpeg(a, 30)):
            out.append(lf.features(data))
    return out


def test_packed_features_verify_as_the_list(monkeypatch):
    feats = _photo_features()
    packed = stages_copy.PackedFeatures.of(feats)
    assert len(packed) == len(feats)
    for f, p in zip(feats, (packed[i] for i in range(len(feats)))):
        for x, y in ((f.kp, p.kp), (f.desc, p.desc), (f.kp_flip, p.kp_flip), (f.desc_flip, p.desc_flip)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert f.size == p.size
    a, b = np.triu_indices(len(feats), 1)
    reference = cd.verify_pairs(feats, a, b, CFG.verify, 12)
    assert (reference >= 12).sum() >= 12  # the copies link, so both outcomes are compared
    monkeypatch.setattr(stages_copy, "VERIFY_BATCH", 7)  # several batches: the packed path
    assert np.array_equal(stages_copy.verify_many(feats, a, b, CFG, 12), reference)


def test_calibration_scores_are_the_per_pair_reference(monkeypatch, images):
    blobs = [images["astronaut"], _jpeg(skimage.data.chelsea()), images["coins64"]]
    copies, distinct = cd.calibration_pairs(blobs, seed=0)
    monkeypatch.setattr(stages_copy, "CALIB_TASK_PAIRS", 9)  # units split over several tasks

    def full(x: bytes, y: bytes) -> int:
        return lf.verify(lf.features(x, CFG.features), lf.features(y, CFG.features), CFG.verify).score(CFG.verify)

    copy_scores, distinct_scores = stages_copy._local_scores(copies, distinct, CFG)
    assert copy_scores == {k: [full(x, y) for x, y in v] for k, v in copies.items()}
    assert distinct_scores == [full(x, y) for x, y in distinct]
    assert any(s >= cd.MIN_INLIERS for v in copy_scores.values() for s in v)


def test_copy_features_are_found_once_per_uid(ray_local, tmp_path):
    """Exact duplicates in later partitions are skipped; every accepted uid has its features."""
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    src = tmp_path / "in"
    src.mkdir()
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.camera()]
    for i, a in enumerate(photos):
        (src / f"a{i}.jpg").write_bytes(_jpeg(a))
    (src / "b_dup.jpg").write_bytes(_jpeg(photos[0]))  # sorts into the second partition
    run = tmp_path / "run"
    stages.run_ingest(stages.plan([str(src)], 3), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())
    units = stages_copy.feature_units(run)
    assert len(units) == 2 and len(units[1].skip) == 1 and not units[0].skip
    stages_copy.run_copyfeat(run)
    uids = [u for p in sorted((run / "copyfeat").glob("part-*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    assert len(uids) == len(set(uids)) == 4
    pool = stages_copy.read_features(run)
    assert len(pool.feats) == 4


def test_skipped_uids_found_by_buckets_in_ray_tasks_equal_the_driver_set(ray_local, tmp_path, monkeypatch):
    """From SKIP_TASKS_FROM partitions on, the uids a partition skips come from uid buckets in
    Ray tasks (no process holds the pool's uids): the same skips and fingerprints as the one
    set, for a uid in three partitions, a duplicate inside one partition and one first seen
    late; copy features then find each uid once."""
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig
    from lvd.curation.stages import ingest_dedup as stages

    src = tmp_path / "in"
    src.mkdir()
    img = {k: _jpeg(getattr(skimage.data, k)()) for k in ("astronaut", "chelsea", "coffee", "camera", "coins")}
    names = {"a0": "astronaut", "a1": "chelsea", "a2": "coffee", "b0": "astronaut", "b1": "camera", "b2": "camera",
             "c0": "astronaut", "c1": "camera", "c2": "coins", "d0": "coins", "d1": "chelsea"}  # fmt: skip
    for name, photo in names.items():
        (src / f"{name}.jpg").write_bytes(img[photo])
    run = tmp_path / "run"
    stages.run_ingest(stages.plan([str(src)], 3), run, IngestConfig())
    stages.run_dedup(run, DedupConfig())
    uid = {k: hashlib.sha256(v).hexdigest() for k, v in img.items()}
    one = stages_copy.feature_units(run, partitioned=False)
    monkeypatch.setattr(stages_copy, "SKIP_UIDS_PER_BUCKET", 2)  # 6 buckets for 11 records: files cross them
    tasks = stages_copy.feature_units(run, partitioned=True)
    want = [set(), {uid["astronaut"]}, {uid["astronaut"], uid["camera"]}, {uid["coins"], uid["chelsea"]}]
    assert [u.skipped() for u in one] == want == [u.skipped() for u in tasks]
    assert [u.fingerprint for u in one] == [u.fingerprint for u in tasks]
    assert [u.index for u in one] == [u.index for u in tasks] and tasks[2].skip_file and not tasks[0].skip_file
    monkeypatch.setattr(stages_copy, "SKIP_TASKS_FROM", 1)  # run_copyfeat takes the bucketed units
    stages_copy.run_copyfeat(run)
    uids = [u for p in sorted((run / "copyfeat").glob("part-*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    assert sorted(uids) == sorted(uid.values())
    assert not (run / "copyfeat" / "skip").exists()  # scratch, gone after the stage


def test_pair_counting_and_candidate_order_match_their_references(monkeypatch):
    """`_counted` by counting (small key range), by int32 and by int64 sorts; the candidate
    order by one int64 key and by lexsort: each as np.unique / np.lexsort."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3000, 20_000) * 977  # repeats, keys beyond 16 bits
    ref = np.unique(x, return_counts=True)
    for bound, count_range in ((3000 * 977, cd.COUNT_RANGE), (3000 * 977, 0), (1 << 40, 0)):
        monkeypatch.setattr(cd, "COUNT_RANGE", count_range)
        got = cd._counted(x, bound)
        assert got[0].dtype == np.int64 and np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    n = 50
    src, dst = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    cnt = rng.integers(4, 9, 4000)  # many ties in count: dst breaks them
    order = np.lexsort((dst, -cnt, src))
    for big in (n, 1 << 30):  # one key; a pool too large for it: lexsort
        got = cd._by_source_most_shared(src, dst, cnt, big)
        assert np.array_equal(got[0], src[order]) and np.array_equal(got[1], dst[order])


def test_distinct_places_count_as_unique_cells():
    rng = np.random.default_rng(2)
    for m in (1, 2, 40, 300):
        pts = rng.uniform(0, 64, (m, 2)).astype(np.float32)
        q = np.floor(pts / 3.0).astype(np.int64)
        assert lf.distinct_places(pts, 3.0) == len(np.unique(q, axis=0))
    assert lf.distinct_places(np.zeros((0, 2), np.float32), 3.0) == 0
    assert lf.distinct_places(np.ones((5, 2), np.float32), 0) == 5


def _reference_descriptor_candidates(feats, k, n_desc=100, tables=4, bits=16, min_shared=4, max_bucket=64, seed=0):
    """Per image pair, the LSH keys both hold (in buckets of at most max_bucket images), by sets."""
    pos = np.random.default_rng(seed).permutation(8 * 32)[: tables * bits].reshape(tables, bits)
    keys = []
    for f in feats:
        d = np.concatenate([f.desc[:n_desc], f.desc_flip[:n_desc]])
        keys.append(set(cd.lsh_keys(d, pos).ravel().tolist()) if len(d) else set())
    holders: dict[int, int] = {}
    for ks in keys:
        for key in ks:
            holders[key] = holders.get(key, 0) + 1
    out = np.full((len(feats), k), -1, np.int64)
    for i, ki in enumerate(keys):
        shared = [(-sum(holders[x] <= max_bucket for x in ki & kj), j) for j, kj in enumerate(keys) if j != i]
        ranked = sorted(s for s in shared if -s[0] >= min_shared)[:k]
        out[i, : len(ranked)] = [j for _, j in ranked]
    return out


@pytest.mark.parametrize("max_bucket", [64, 5])  # 5: the copies' shared buckets are skipped too
def test_descriptor_candidates_are_the_shared_key_reference(max_bucket):
    feats = _photo_features()
    got = cd.descriptor_candidates(feats, 6, max_bucket=max_bucket)
    assert np.array_equal(got, _reference_descriptor_candidates(feats, 6, max_bucket=max_bucket))
    assert (got >= 0).sum() >= 12  # copies share keys: partners found


def _exact_pair(n: int = 20) -> list[lf.Features]:
    """Two images whose n keypoints (one per 3 px place) match one to one and all fit: the
    score, the inliers, the ratio matches and their places are all n (a gate off by one at
    any of them refuses the pair at threshold n)."""
    rng = np.random.default_rng(3)
    xy = np.stack(np.meshgrid(np.arange(5) * 45 + 20.0, np.arange(4) * 55 + 20.0), -1).reshape(-1, 2)[:n]
    desc = rng.integers(0, 256, (n, lf.DESC_BYTES), dtype=np.uint8)
    mirrored = np.c_[255 - xy[:, 0], xy[:, 1]].astype(np.float32)
    return [
        lf.Features(xy.astype(np.float32), desc, mirrored, rng.integers(0, 256, desc.shape, dtype=np.uint8), (256, 256))
        for _ in range(2)
    ]


def test_verification_gates_decide_as_the_full_fit():
    """With a threshold, an orientation scores 0 as soon as its score provably stays below it
    (ratio matches, their distinct places on either side, RANSAC inliers, their distinct
    places): every pair links exactly as the full fit of each orientation says, with its
    score, at thresholds on either side of every score (the tightest gates)."""
    feats, cfg = _photo_features() + _exact_pair(), CFG.verify
    a, b = np.triu_indices(len(feats), 1)
    full = []  # (direct, mirrored) scores of the full fits, the pair in verify's order
    for i, j in zip(a.tolist(), b.tolist()):
        fa, fb = feats[i], feats[j]
        if lf._order_key(fb) < lf._order_key(fa):
            fa, fb = fb, fa
        full.append(
            tuple(
                lf._verify_one(fa.kp, fa.desc, fa.size, kp, desc, fb.size, cfg, flipped).score(cfg)
                for kp, desc, flipped in ((fb.kp, fb.desc, False), (fb.kp_flip, fb.desc_flip, True))
            )
        )
    scores = {s for pair in full for s in pair if s >= cd.MIN_INLIERS}
    assert len(scores) >= 8 and any(m > d for d, m in full)  # links of many scores, some mirrored only
    for t in sorted({t for s in scores for t in (s - 1, s, s + 1)}):
        want = [d if d >= t else m if m >= t else -1 for d, m in full]
        got = cd.verify_pairs(feats, a, b, cfg, t)
        assert [g if g >= t else -1 for g in got.tolist()] == want, t
