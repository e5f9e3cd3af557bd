"""Model-free copy evidence: ORB local features, geometric verification, a global descriptor.

A copy (resized, recompressed, re-encoded, brightened, cropped, mirrored, with a caption or a
sticker pasted on) keeps most of its local structure, moved by one similarity transform
(scale, rotation, shift; a mirror for flips). Two distinct photos, even of one scene type,
do not: their descriptor matches are few and point every which way. So a candidate pair is
verified by counting the correspondences that one transform explains (RANSAC inliers), and by
whether one frame lies within the other (`containment`): a copy's content lies within the other
image, while a burst-like neighbour (the camera panned) or a shared logo matches only a part.

`features(img)`: ORB keypoints and descriptors of the grayscale image scaled so its longer side
is `FeatureConfig.side`, contrast-equalised (CLAHE: faint photos get keypoints too) and spread
over a 4 x 4 grid (a pasted logo cannot take the whole budget), and the same of its mirror
image (for flipped copies). `verify(fa, fb)` matches A's descriptors to B's (Lowe ratio test),
fits a similarity transform (RANSAC, deterministic seed, scale within 1/2..2 since feature
images share one size), and returns the inlier count and the containment of the frames: A's
frame mapped into B's, the overlap over each frame's area; the larger must be >= 0.85 (one
image lies inside the other: a crop, an overlay) and the smaller >= 0.3 (it keeps enough of
the other). A burst-like neighbour overlaps only partly and fails. Inliers count once per
place (3 px of the source image: ORB finds one corner at several scales, and an image upscaled
to the feature side has no more places than its own pixels), and their convex hull must cover 5% of
the overlap: a look-alike detail (two trousers' crotch) or a shared sticker matches in one
patch. The pair is taken in one order whatever the caller's, so the verdict is symmetric. The
mirror of B is tried only when the direct match is not already conclusive.

`global_descriptor(img)`: a 144-d model-free vector for k-NN candidate search when no embedder
is given: an HSV colour histogram (8 hue x 4 saturation x 4 value) and a mirror-folded histogram
of gradient orientations (2 magnitude bands x 8), square-rooted and L2-normalised. It is
invariant to flips and nearly so to crops and overlays; it proposes, verification decides.

Costs on this project's 2-core machine (benchmarks/copy_quality.py): features about 5 ms of
CPU per image at 256 px (both orientations), a verification about 0.25 ms of CPU per pair (two
300 x 300 Hamming matrices; RANSAC only for pairs whose ratio matches, counted once per place,
can reach the threshold, and the frames' overlap only for fits whose inliers can).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import faiss
import numpy as np
import pyarrow as pa
from PIL import Image

DESC_BYTES = 32  # ORB descriptors are 256 bits
GLOBAL_DIM = 144
GLOBAL_SIDE = 128  # the global descriptor reads the image at this longer side
HASH_SIDE = 64  # the equalised hashes read a 64 x 64 squash (what pHash-256 reads anyway)

FEATURE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("fw", pa.int32()),  # feature image width, height (longer side = cfg.side)
        pa.field("fh", pa.int32()),
        pa.field("kp", pa.binary()),  # float32 [n, 2] keypoint x, y
        pa.field("desc", pa.binary()),  # uint8 [n, 32]
        pa.field("kp_flip", pa.binary()),  # same for the mirror image
        pa.field("desc_flip", pa.binary()),
        pa.field("glob", pa.binary()),  # float32 [GLOBAL_DIM] global descriptor
        pa.field("nhash", pa.binary(32)),  # 256-bit pHash of the equalised image
        pa.field("nhash_flip", pa.binary(32)),  # same of its mirror
        pa.field("up", pa.float32()),  # feature pixels per decoded-image pixel, >= 1 (`Features.up`)
    ]
)
# The copyfeat stage's outputs change with this (part of its config hash): 2 added `up`.
FEATURES_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    side: int = 256  # longer side of the grayscale image features are found on
    n_features: int = 300  # ORB keypoints kept per image (strongest per grid cell first)
    fast_threshold: int = 5  # ORB's FAST threshold (lower finds keypoints on softer images)

    def __post_init__(self):
        if not 64 <= self.side <= 2048:
            raise ValueError(f"side={self.side}: use 64..2048 pixels")
        if not 16 <= self.n_features <= 5000:
            raise ValueError(f"n_features={self.n_features}: use 16..5000")
        if not 1 <= self.fast_threshold <= 100:
            raise ValueError(f"fast_threshold={self.fast_threshold}: use 1..100")


@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    ratio: float = 0.8  # Lowe's ratio test on the two nearest descriptors
    reproj_px: float = 4.0  # RANSAC inlier distance, pixels of the feature image
    # One image must lie within the other: its frame, mapped by the fitted transform, falls
    # this much inside the other's frame (a crop, an overlay, a resize: ~1; a burst-like
    # neighbour, the camera panned: its overlap only) ...
    min_contained: float = 0.85
    # ... and keep at least this fraction of the other's frame (a crop keeping 60% keeps 0.6;
    # a small logo found inside a photo is not a copy of it)
    min_kept: float = 0.3
    # Feature images share one longer side, so a resized copy matches at scale ~1 and a crop
    # keeping a quarter of the area at ~2; a tighter range also refuses degenerate fits that
    # shrink one image's keypoints into a dense patch of the other's.
    max_scale: float = 2.0  # the transform's scale stays within [1/max_scale, max_scale]
    # Inliers count once per `inlier_cell` x `inlier_cell` pixels of each image's *source*
    # (the smaller count of the two): ORB finds one corner at several pyramid levels, a pixel
    # or two apart, and those are one piece of evidence, not several. An image smaller than
    # the feature side is upscaled to it (`Features.up` feature pixels per source pixel), and
    # its corners a few feature pixels apart are one source pixel: counted in feature pixels,
    # two 96 px product shots of one cut (a distinct look-alike pair) scored up to 19, in
    # source pixels 14, while their copies kept their scores (README, "Copy detection").
    inlier_cell: float = 3.0
    # The inliers' convex hull must cover this fraction of the frames' overlap: a shared
    # sticker, caption or one look-alike detail matches in one small patch (measured on the
    # benchmark dump: <= 0.07 for every such pair; copies' links mostly >= 0.15).
    min_spread: float = 0.05

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio={self.ratio}: use a fraction in (0, 1)")
        if not 0 < self.reproj_px <= 32:
            raise ValueError(f"reproj_px={self.reproj_px}: use 0..32 pixels")
        if not 0 <= self.min_contained <= 1 or not 0 <= self.min_kept <= 1:
            raise ValueError(f"min_contained={self.min_contained}, min_kept={self.min_kept}: use fractions in [0, 1]")
        if not self.max_scale >= 1:
            raise ValueError(f"max_scale={self.max_scale}: use >= 1")
        if not 0 <= self.inlier_cell <= 64 or not 0 <= self.min_spread <= 1:
            raise ValueError(
                f"inlier_cell={self.inlier_cell}, min_spread={self.min_spread}: use 0..64 pixels and a fraction"
            )


@dataclass(frozen=True)
class Features:
    """One image's local features (both orientations) in the feature image's pixels."""

    kp: np.ndarray  # float32 [n, 2]
    desc: np.ndarray  # uint8 [n, 32]
    kp_flip: np.ndarray
    desc_flip: np.ndarray
    size: tuple[int, int] = (0, 0)  # feature image width, height
    up: float = 1.0  # feature pixels per source pixel (>= 1: the image was upscaled to the side)

    @classmethod
    def from_row(cls, row: dict) -> Features:
        return cls(
            np.frombuffer(row["kp"], np.float32).reshape(-1, 2),
            np.frombuffer(row["desc"], np.uint8).reshape(-1, DESC_BYTES),
            np.frombuffer(row["kp_flip"], np.float32).reshape(-1, 2),
            np.frombuffer(row["desc_flip"], np.uint8).reshape(-1, DESC_BYTES),
            (int(row["fw"]), int(row["fh"])),
            float(row["up"]),
        )


class Verdict(tuple):
    """(inliers, contained, kept, flipped, spread) of the better orientation: RANSAC inliers
    (distinct places, `VerifyConfig.inlier_cell`), how much of the smaller-overlap image's
    frame lies in the other's, how much of the other's frame it keeps, and the inliers' convex
    hull over the frames' overlap; `score` is what thresholds see."""

    __slots__ = ()

    def __new__(cls, inliers: int, contained: float, kept: float, flipped: bool, spread: float = 0.0):
        return super().__new__(cls, (int(inliers), float(contained), float(kept), bool(flipped), float(spread)))

    inliers = property(lambda self: self[0])
    contained = property(lambda self: self[1])
    kept = property(lambda self: self[2])
    flipped = property(lambda self: self[3])
    spread = property(lambda self: self[4])

    def score(self, cfg: VerifyConfig) -> int:
        """Inliers when one image lies within the other and the inliers spread over their
        overlap, else 0 (a partial overlap is no copy; nor is one shared patch)."""
        ok = self.contained >= cfg.min_contained and self.kept >= cfg.min_kept and self.spread >= cfg.min_spread
        return self.inliers if ok else 0


NO_MATCH = Verdict(0, 0.0, 0.0, False)


def set_threads(n: int = 1) -> None:
    """OpenCV's and Faiss's thread pools; one per Ray task keeps 1-CPU tasks from oversubscribing."""
    cv2.setNumThreads(n)
    faiss.omp_set_num_threads(n)


def decode_oriented(data: bytes, side: int) -> Image.Image:
    """RGB image of encoded bytes, EXIF-oriented; a JPEG larger than `side` DCT-downscaled
    while both sides stay >= `side` (accepted bytes: ingest's formats). No torch: Ray
    workers of the copy stages import only this module's dependencies."""
    from lvd.curation.ingest import WEB_FORMATS
    from lvd.curation.pixels import to_rgb, upright

    img = Image.open(io.BytesIO(data), formats=WEB_FORMATS)
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (side, side))
    img.load()
    return to_rgb(upright(img))  # broken EXIF: the stored orientation, as ingest takes it


def feature_images(data: bytes, side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(gray uint8 [h, w], rgb uint8 [h, w, 3], `Features.up`) of encoded image bytes,
    EXIF-oriented, longer side scaled to `side` (JPEG draft decoding first when the file is
    larger); up: feature pixels per decoded pixel, at least 1 (a JPEG draft-decoded smaller is
    still larger than `side`: 1)."""
    rgb = np.asarray(decode_oriented(data, side))
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = cv2.resize(rgb, size, interpolation=interp)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), rgb, max(1.0, float(scale))


def features_row(uid: str, data: bytes, cfg: FeatureConfig = FeatureConfig()) -> dict:
    """One FEATURE_SCHEMA row for an accepted image's bytes."""
    from lvd.curation.phash import PHASH256_SIZE, equalise, phash_bits

    gray, rgb, up = feature_images(data, cfg.side)
    (kp, desc), (kp_f, desc_f) = _detect(_orb(cfg), gray)
    eq = equalise(cv2.resize(gray, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA))
    small = cv2.resize(rgb, _fit(rgb.shape, GLOBAL_SIDE), interpolation=cv2.INTER_AREA)
    return {
        "uid": uid, "fw": gray.shape[1], "fh": gray.shape[0],
        "kp": kp.tobytes(), "desc": desc.tobytes(), "kp_flip": kp_f.tobytes(), "desc_flip": desc_f.tobytes(),
        "glob": global_descriptor(small).tobytes(),
        "nhash": np.packbits(phash_bits(eq, PHASH256_SIZE)).tobytes(),
        "nhash_flip": np.packbits(phash_bits(eq[:, ::-1], PHASH256_SIZE)).tobytes(),
        "up": up,
    }  # fmt: skip


def features(data: bytes, cfg: FeatureConfig = FeatureConfig()) -> Features:
    return Features.from_row(features_row("", data, cfg))


def local_features(data: bytes, cfg: FeatureConfig = FeatureConfig()) -> Features:
    """The local features of `features` alone, without the global descriptor and the hashes
    that only candidate search reads (calibration's images are verified, never searched):
    the same arrays, ~15% less CPU."""
    gray, _, up = feature_images(data, cfg.side)
    (kp, desc), (kp_f, desc_f) = _detect(_orb(cfg), gray)
    return Features(kp, desc, kp_f, desc_f, (gray.shape[1], gray.shape[0]), up)


def _fit(shape, side: int) -> tuple[int, int]:
    h, w = shape[:2]
    s = min(1.0, side / max(h, w))
    return max(1, round(w * s)), max(1, round(h * s))


_ORB_CACHE: dict = {}
_GRID = 4  # keypoints are spread over a GRID x GRID layout of the image


def _orb(cfg: FeatureConfig):
    if cfg not in _ORB_CACHE:
        _ORB_CACHE[cfg] = (
            # ORB keeps its strongest keypoints per pyramid level before the grid picks: with
            # 2x the budget a sticker's corners took nearly all of them (the overlay copies
            # then matched their originals nowhere else); 8x leaves every cell candidates
            cv2.ORB_create(nfeatures=8 * cfg.n_features, fastThreshold=cfg.fast_threshold),
            cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)),
            cfg.n_features,
        )
    return _ORB_CACHE[cfg]


def _detect(orb, gray: np.ndarray) -> tuple[tuple, tuple]:
    """((kp, desc), (kp_mirror, desc_mirror)): ORB on the CLAHE-equalised image (faint photos
    get keypoints too; brightness and contrast changes matter less), keeping the strongest
    keypoints of each cell of a GRID x GRID layout first, so a pasted logo or caption cannot
    take the whole keypoint budget; then the same keypoints mirrored (x -> w - 1 - x, angle ->
    180 - angle) described on the mirror image, for flipped copies (no second detection)."""
    detector, clahe, n = orb
    gray = clahe.apply(gray)
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, DESC_BYTES), np.uint8))
    kps = detector.detect(gray, None)
    if not kps:
        return empty, empty
    h, w = gray.shape
    xy = cv2.KeyPoint_convert(kps).reshape(-1, 2)  # float32 [n, 2], the same values as k.pt
    response = np.array([k.response for k in kps], np.float32)
    cell = np.minimum(_GRID - 1, (xy[:, 1] * _GRID / h).astype(int)) * _GRID + np.minimum(
        _GRID - 1, (xy[:, 0] * _GRID / w).astype(int)
    )
    order = np.lexsort((-response, cell))  # by cell, strongest first
    rank_in_cell = np.arange(len(order)) - np.searchsorted(cell[order], cell[order])
    per_cell = max(1, n // (2 * _GRID * _GRID))  # half the budget spread over the cells, half the strongest
    first = order[rank_in_cell < per_cell]
    rest = order[rank_in_cell >= per_cell]
    pick = np.concatenate(
        [first[np.argsort(-response[first], kind="stable")], rest[np.argsort(-response[rest], kind="stable")]]
    )[:n]
    keep, desc = detector.compute(gray, [kps[i] for i in pick.tolist()])
    if desc is None or not keep:
        return empty, empty
    direct = (cv2.KeyPoint_convert(keep).reshape(-1, 2), np.ascontiguousarray(desc, np.uint8))
    mirrored = [
        cv2.KeyPoint(w - 1 - k.pt[0], k.pt[1], k.size, (180.0 - k.angle) % 360.0, k.response, k.octave, k.class_id)
        for k in keep
    ]
    keep_m, desc_m = detector.compute(np.ascontiguousarray(gray[:, ::-1]), mirrored)
    if desc_m is None or not keep_m:
        return direct, empty
    return direct, (cv2.KeyPoint_convert(keep_m).reshape(-1, 2), np.ascontiguousarray(desc_m, np.uint8))


def verify(fa: Features, fb: Features, cfg: VerifyConfig = VerifyConfig(), *, enough: int = 1 << 30) -> Verdict:
    """The better of (A vs B) and (A vs mirrored B); the mirror is skipped once the direct
    match scores `enough` (the caller's threshold: more cannot change its decision). With a
    threshold given, an orientation scores 0 as soon as its score provably stays below it
    (`_verify_one`'s `need`), which decides the same: only scores >= `enough` are exact.
    Symmetric: the pair is taken in one order whichever comes first (Lowe's test and RANSAC
    are not), so verify(A, B) and verify(B, A) give one verdict (pool, calibration and
    eval-set pairs are ordered differently)."""
    if _order_key(fb) < _order_key(fa):
        fa, fb = fb, fa
    need = 0 if enough >= 1 << 30 else enough
    ups = (fa.up, fb.up)
    direct = _verify_one(fa.kp, fa.desc, fa.size, fb.kp, fb.desc, fb.size, cfg, False, need, ups)
    if direct.score(cfg) >= enough:
        return direct
    mirrored = _verify_one(fa.kp, fa.desc, fa.size, fb.kp_flip, fb.desc_flip, fb.size, cfg, True, need, ups)
    return max(direct, mirrored, key=lambda v: (v.score(cfg), v.inliers))


def _order_key(f: Features) -> tuple:
    return f.size, len(f.desc), f.desc.tobytes(), f.kp.tobytes(), f.up


_INT32_MAX = np.iinfo(np.int32).max


def ratio_matches(da: np.ndarray, db: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows of A, rows of B): each A descriptor's nearest B descriptor (Hamming), kept when
    nearer than `ratio` times the second nearest (Lowe's test; a tie never passes). What
    OpenCV's BFMatcher.knnMatch(k=2) + the test give, from Faiss's all-pairs popcount (about
    9x faster on 300 x 300 ORB descriptors, no DMatch objects)."""
    na, nb = len(da), len(db)
    d_AB = np.empty((na, nb), np.int32)
    faiss.hammings(
        faiss.swig_ptr(np.ascontiguousarray(da)),
        faiss.swig_ptr(np.ascontiguousarray(db)),
        na,
        nb,
        DESC_BYTES,
        faiss.swig_ptr(d_AB),
    )
    nearest = d_AB.argmin(axis=1)
    rows = np.arange(na)
    best = d_AB[rows, nearest]
    d_AB[rows, nearest] = _INT32_MAX  # the second nearest is then the row's minimum
    second = d_AB.min(axis=1)
    ok = best < ratio * second
    return np.flatnonzero(ok), nearest[ok]


def _verify_one(
    pa_, da, size_a, pb, db, size_b, cfg: VerifyConfig, flipped: bool, need: int = 0, ups=(1.0, 1.0)
) -> Verdict:
    """One orientation's verdict; with `need` > 0 (the caller's threshold) it scores 0 as soon
    as its score provably stays below `need`, skipping the rest: the score counts distinct
    places of RANSAC inliers, which are a subset of the ratio-test matches, so it is at most
    the matches' count, their distinct places on either side, and the inliers' count (on the
    benchmark dump a fifth of the fits and four fifths of what follows them are skipped).
    `ups`: each side's `Features.up`, so places are its source image's cells."""
    cell_a, cell_b = cfg.inlier_cell * ups[0], cfg.inlier_cell * ups[1]
    if len(da) < 2 or len(db) < 2:
        return NO_MATCH
    ia, ib = ratio_matches(da, db, cfg.ratio)
    if len(ia) < max(3, need):
        return Verdict(0, 0.0, 0.0, flipped)
    a, b = pa_[ia], pb[ib]
    if need and min(distinct_places(a, cell_a), distinct_places(b, cell_b)) < need:
        return Verdict(0, 0.0, 0.0, flipped)
    cv2.setRNGSeed(0)  # RANSAC samples from OpenCV's RNG: same pair, same verdict
    model, mask = cv2.estimateAffinePartial2D(
        a, b, method=cv2.RANSAC, ransacReprojThreshold=cfg.reproj_px, maxIters=2000, confidence=0.995
    )
    if model is None or mask is None:
        return Verdict(0, 0.0, 0.0, flipped)
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    if not 1.0 / cfg.max_scale <= scale <= cfg.max_scale:
        return Verdict(0, 0.0, 0.0, flipped)
    inl = mask.ravel().astype(bool)
    if need and np.count_nonzero(inl) < need:
        return Verdict(0, 0.0, 0.0, flipped)
    n = min(distinct_places(a[inl], cell_a), distinct_places(b[inl], cell_b))
    if n < need:
        return Verdict(0, 0.0, 0.0, flipped)
    inter, area_a = _overlap(model, size_a, size_b)
    if inter <= 0 or area_a <= 0:
        return Verdict(n, 0.0, 0.0, flipped)
    in_a, in_b = inter / area_a, inter / float(size_b[0] * size_b[1])
    spread = _hull_area(b[inl]) / inter  # both in B's pixels
    return Verdict(n, max(in_a, in_b), min(in_a, in_b), flipped, spread)


def distinct_places(pts: np.ndarray, cell: float) -> int:
    """Points counted once per `cell` x `cell` square (all of them when cell is 0)."""
    if cell <= 0 or not len(pts):
        return len(pts)
    q = np.floor(pts / cell).astype(np.int64)
    key = np.sort(q[:, 0] * (1 << 20) + q[:, 1])  # one sort: numpy 2.4's np.unique hashes first, 3x slower here
    return int(np.count_nonzero(key[1:] != key[:-1])) + 1


def _hull_area(pts: np.ndarray) -> float:
    return float(cv2.contourArea(cv2.convexHull(np.ascontiguousarray(pts, np.float32)))) if len(pts) >= 3 else 0.0


def _overlap(model_A_to_B: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> tuple[float, float]:
    """(overlap area, A's frame area), both in B's pixels, under a 2x3 transform A -> B."""
    (wa, ha), (wb, hb) = size_a, size_b
    if min(wa, ha, wb, hb) <= 0:
        return 0.0, 0.0
    corners = np.array([[0, 0], [wa, 0], [wa, ha], [0, ha]], np.float32)
    mapped = corners @ model_A_to_B[:, :2].T.astype(np.float32) + model_A_to_B[:, 2].astype(np.float32)
    frame_b = np.array([[0, 0], [wb, 0], [wb, hb], [0, hb]], np.float32)
    inter, _ = cv2.intersectConvexConvex(mapped.reshape(-1, 1, 2), frame_b.reshape(-1, 1, 2))
    return float(inter), abs(float(cv2.contourArea(mapped)))  # A's frame, in B's pixels


def containment(model_A_to_B: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> tuple[float, float]:
    """(contained, kept) of the two frames under a 2x3 transform A -> B: the overlap area over
    each frame's own area, the larger (how much the contained image lies in the other) and the
    smaller (how much of the other it keeps)."""
    inter, area_a = _overlap(model_A_to_B, size_a, size_b)
    if area_a <= 0:
        return 0.0, 0.0
    in_a, in_b = inter / area_a, inter / float(size_b[0] * size_b[1])
    return max(in_a, in_b), min(in_a, in_b)


def global_descriptor(rgb: np.ndarray) -> np.ndarray:
    """float32 [GLOBAL_DIM], L2-normalised: colour histogram + mirror-folded gradient histogram."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in 0..179, S, V in 0..255
    h = (hsv[..., 0].astype(np.int32) * 8) // 180
    s = hsv[..., 1].astype(np.int32) // 64
    v = hsv[..., 2].astype(np.int32) // 64
    colour = np.bincount((h * 16 + s * 4 + v).ravel(), minlength=128).astype(np.float64)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    ang = np.abs(np.arctan2(gy, gx))  # mirror maps theta -> pi - theta: fold to [0, pi/2]
    ang = np.minimum(ang, np.pi - ang)
    a_bin = np.minimum((ang / (np.pi / 2) * 8).astype(np.int32), 7)
    strong = mag > mag.mean()
    grad = np.bincount((a_bin + 8 * strong).ravel(), weights=mag.ravel(), minlength=16)
    parts = [colour / max(colour.sum(), 1.0), grad / max(grad.sum(), 1e-9)]
    vec = np.sqrt(np.concatenate(parts))
    return (vec / max(np.linalg.norm(vec), 1e-12)).astype(np.float32)
