"""The copy detector's cost work decides exactly as before: each speedup (cheaper keypoint
handling, packed features for verification tasks, one round of calibration tasks that
describes each image once, features found once per uid) is checked against the plain
computation it replaced, on real images (scikit-image)."""

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


# sha256 (first 16 hex) of every field of features_row, as the code before the keypoint
# speedups (cv2.KeyPoint_convert instead of per-keypoint Python) computed them: a change here
# changes every verification. A deliberate feature change (ORB budget, grid) updates these
# digests: print {k: _digest(lf.features_row("", d)) for k, d in images.items()} once.
GOLDEN = {  # ORB budget 8x n_features, half the budget per grid cell (was 2x, all of it)
    "astronaut": "f27df7ba7d301d3b",
    "chelsea": "7720e0d0055123b9",
    "camera": "3a4a305d6bed09cb",
    "coins64": "6c36c799ce8ac1ef",
}


def _digest(row: dict) -> str:
    parts = [row[f] if isinstance(row[f], bytes) else str(row[f]).encode() for f in sorted(row)]
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def test_features_are_the_reference_features(images):
    assert {k: _digest(lf.features_row("", d)) for k, d in images.items()} == GOLDEN


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
