"""Copy detection whose precision does not depend on the embedder.

Two roles, as in Oquab et al. 2023 (sec. 3, app. A): an embedder (any backbone, even a weak
one) and hashes only *propose* candidate pairs; a copy descriptor *decides*. The decision is
either model-free geometric verification of local features (`lvd.curation.localfeat`: ORB +
RANSAC, mirrored matching for flips) or, when the user has one, the cosine of a copy-detection
model's descriptors (SSCD TorchScript files, as the paper used at 1.2B scale; any lvd /
official / HF backbone can stand in). Its threshold is calibrated at run time on the pool's
own images, never taken from a paper.

Pipeline of one pool (`detect`):
1. candidates: pairs within `hash_radius` bits of the 256-bit pHash of the equalised image
   (`nhash`; also against the mirror's hash, for flips) and each image's `k` nearest
   neighbours by the proposer vectors (the model-free `glob` descriptor, and the embedder's
   or copy model's vectors when given); at most `max_verify` candidates per image, hash
   candidates first, then neighbours nearest first;
2. decision: a verified score (inliers spanning the image, or cosine) above the threshold;
3. components: union of the decided edges with the hash dedup stage's groups; a component
   that grew by chaining (A~B~C with A and C unrelated) is split into stars: members in rank
   order (most pixels, then uid) join the first centre they are themselves linked with, else
   become a centre (`split_chains`); every kept link is then direct, never through a third
   image;
4. guard: a stage that would remove more than `max_remove` of its input raises
   `MassRemovalError` before anything is written.

Calibration (`Calibrator`): `calib_images` pool images (a seeded sample) get known copies
(`CALIB_KINDS`: resize, JPEG q30, crop keeping 64%, brightness, contrast, flip, a caption
band); distinct pairs are four pairs of disjoint parts of each sampled image (its top and
bottom halves, both diagonal pairs of quadrants, its top and bottom thirds: one scene, one
camera, one texture, no shared pixels: the hardest distinct pairs a pool can hold, and never
true copies, which random pool pairs of a copy-heavy dump would often be). Parts are never
split left from right: a mirror-symmetric object's left half is its right half flipped, which
the detector rightly links. A periodic texture (a brick wall) links its own
parts, and so raises the threshold: calibration errs towards keeping images. The threshold is the smallest score that links
at most `false_link_rate` of the distinct pairs (and at least `MIN_INLIERS` for the model-free
score); the report gives it with the copy recall per kind and the false links seen. A threshold
given by the user replaces the calibrated one and is reported the same way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from lvd.curation.hamming_pairs import candidate_pairs
from lvd.curation.knn_index import build_index, search
from lvd.curation.localfeat import FeatureConfig, Features, VerifyConfig, verify
from lvd.curation.uidbuckets import uid_hash
from lvd.curation.unionfind import UnionFind

METHOD_LOCAL = "copy"  # dedup method name of edges decided by local-feature verification
METHOD_MODEL = "copy-model"  # ... by a copy model's cosine
MIN_INLIERS = 12  # a floor for the calibrated inlier threshold: random matches give fewer
COUNT_RANGE = 1 << 23  # `_counted` counts with n * n counters up to this many (n <= 2,896 images; 64 MiB)
CALIB_KINDS = ("resized", "jpeg30", "crop64", "brighter", "contrast", "flipped", "caption")


@dataclass(frozen=True, kw_only=True)
class CopyDetectConfig:
    k: int = 64  # neighbours searched per image (paper: 64)
    max_verify: int = 16  # candidates decided per image (hash ones first, then nearest)
    hash_radius: int = 24  # bits of the 256-bit equalised pHash within which pairs are candidates
    threshold: float | None = None  # user's threshold (inliers, or cosine with a copy model)
    false_link_rate: float = 0.005  # calibration target among the hardest distinct pairs (one photo's parts)
    calib_images: int = 64  # pool images sampled for calibration (their parts: the distinct pairs)
    # of those, how many also get known copies with model-free verification (its threshold reads
    # only the distinct pairs; the copies give the recall report): 32 saves a quarter of the
    # calibration's features. A copy model's threshold reads the copies too: all get them there.
    calib_copy_images: int = 32
    max_remove: float = 0.5  # guard: refuse to remove more than this fraction of the input
    max_centres: int = 64  # chain splitting: centres tried per member before it stays alone
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self):
        if self.k < 1 or self.max_verify < 1:
            raise ValueError(f"k={self.k}, max_verify={self.max_verify}: use at least 1 each")
        if not 0 <= self.hash_radius < 128:
            raise ValueError(f"hash_radius={self.hash_radius}: use 0..127 bits")
        if not 0 < self.false_link_rate < 0.5:
            raise ValueError(f"false_link_rate={self.false_link_rate}: use a small fraction, e.g. 0.002")
        if self.calib_images < 4:
            raise ValueError(f"calib_images={self.calib_images}: sample at least 4 images")
        if self.calib_copy_images < 1:
            raise ValueError(f"calib_copy_images={self.calib_copy_images}: copy at least 1 image")
        if not 0 < self.max_remove <= 1:
            raise ValueError(f"max_remove={self.max_remove}: use a fraction in (0, 1]")
        if self.max_centres < 1:
            raise ValueError(f"max_centres={self.max_centres}: use at least 1")
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", FeatureConfig(**self.features))
        if isinstance(self.verify, dict):
            object.__setattr__(self, "verify", VerifyConfig(**self.verify))


# ---------------------------------------------------------------- candidates


def _words(codes_N32: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes_N32, np.uint8).view(np.uint64)


def hamming(a_N32: np.ndarray, b_N32: np.ndarray) -> np.ndarray:
    return np.bitwise_count(_words(a_N32) ^ _words(b_N32)).sum(axis=1)


def hash_candidates(
    nhash: np.ndarray, nhash_flip: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, bits) with a < b: images whose equalised 256-bit pHashes are within `radius`
    bits, directly or one against the other's mirror."""
    n = len(nhash)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = np.concatenate([nhash, nhash_flip])
    a, b = candidate_pairs(_words(codes), radius)
    d = hamming(codes[a], codes[b])
    keep = d <= radius
    a, b, d = a[keep] % n, b[keep] % n, d[keep]
    a, b = np.minimum(a, b), np.maximum(a, b)
    ok = a != b
    return _unique_pairs(a[ok], b[ok], d[ok])


def mirror_hash_pairs(
    nhash: np.ndarray, nhash_flip: np.ndarray, radius: int, log_aspect: np.ndarray, max_aspect: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) decided by hashes alone: one image's equalised pHash within `radius` bits
    of the other's mirror image's, aspect ratios agreeing: the hash dedup's equalised channel
    (same radius, same measured margin), for mirrored copies."""
    n = len(nhash)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = np.concatenate([nhash, nhash_flip])
    a, b = candidate_pairs(_words(codes), radius)
    cross = (a < n) != (b < n)
    a, b = a[cross], b[cross]
    ok = hamming(codes[a], codes[b]) <= radius
    a, b = a[ok] % n, b[ok] % n
    ok = (a != b) & (np.abs(log_aspect[a] - log_aspect[b]) <= math.log(max_aspect) + 1e-12)
    key = sorted_unique(np.minimum(a[ok], b[ok]) * n + np.maximum(a[ok], b[ok]))
    return key // n, key % n


def cross_hash_candidates(q_hash, pool_hash, pool_flip, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, pool row) within `radius` bits, directly or against the pool's mirror."""
    nq = len(q_hash)
    codes = np.concatenate([q_hash, pool_hash, pool_flip])
    if len(codes) < 2 or nq == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = candidate_pairs(_words(codes), radius)
    keep = (a < nq) & (b >= nq) & (hamming(codes[a], codes[b]) <= radius)
    q, p = a[keep], (b[keep] - nq) % len(pool_hash)
    key = sorted_unique(q * len(pool_hash) + p)
    return key // len(pool_hash), key % len(pool_hash)


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) of an integer array by one sort: numpy 2.4's np.unique without return_*
    flags hashes first, 20x slower on the millions of LSH keys and pairs here."""
    s = np.sort(np.ravel(x))
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def _unique_pairs(a, b, d):
    order = np.lexsort((d, b, a))
    a, b, d = a[order], b[order], d[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], d[first]


def knn_lists(
    vecs_ND: np.ndarray, k: int, queries_QD: np.ndarray | None = None, *, exclude_self: bool = True
) -> np.ndarray:
    """int64 [Q, k]: each query's nearest pool rows (self excluded), -1 padded."""
    index = build_index(vecs_ND)
    q = vecs_ND if queries_QD is None else queries_QD
    if not len(q) or not len(vecs_ND):
        return np.full((len(q), k), -1, np.int64)
    nb = search(index, np.asarray(q), min(k + 1, len(vecs_ND)))
    ids = nb.ids_QK
    if exclude_self and queries_QD is None:  # drop each row's own id, keep the order, pad at the end
        ids = np.where(ids == np.arange(len(ids))[:, None], -1, ids)
        ids = np.take_along_axis(ids, np.argsort(ids < 0, axis=1, kind="stable"), axis=1)
    ids = ids[:, :k]
    if ids.shape[1] < k:
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    return ids


def descriptor_candidates(
    feats: list[Features],
    k: int,
    *,
    n_desc: int = 100,
    tables: int = 4,
    bits: int = 16,
    min_shared: int = 4,
    max_bucket: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """int64 [N, k]: each image's partners by shared local-descriptor keys, most shared first.

    Locality-sensitive hashing of ORB descriptors: `tables` keys of `bits` fixed random bits of
    each of an image's first `n_desc` descriptors (the strongest per grid cell). A copy keeps
    most local structure, so many of its descriptors fall in the same buckets as the
    original's, whatever was cropped, pasted on or mirrored (the mirror image's descriptors
    count for the image too); distinct images share a few by chance. Buckets holding more
    than `max_bucket` images (repetitive structure) are skipped. Cost: N * n_desc * tables
    keys, sorted; pairs per bucket grow as (N * n_desc / 2**bits)**2, so `bits` should grow
    with log2(N) beyond ~10**5 images."""
    n = len(feats)
    out = np.full((n, k), -1, np.int64)
    if n < 2:
        return out
    pos = np.random.default_rng(seed).permutation(8 * 32)[: tables * bits].reshape(tables, bits)
    descs = [d[:n_desc] for f in feats for d in (f.desc, f.desc_flip)]
    owners = np.repeat(np.arange(n, dtype=np.int64).repeat(2), [len(d) for d in descs])
    if not len(owners):
        return out
    keys = lsh_keys(np.concatenate(descs), pos)  # [m, tables]
    key_owner = sorted_unique(keys * n + owners[:, None])  # one entry per (key, image)
    keys, owners = key_owner // n, key_owner % n
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    pair_keys = []
    for size in np.unique(sizes):
        if size < 2 or size > max_bucket:
            continue
        idx = starts[sizes == size]
        members = owners[idx[:, None] + np.arange(size)]  # [buckets, size], ascending in each bucket
        ii, jj = np.triu_indices(size, 1)
        pair_keys.append((members[:, ii] * n + members[:, jj]).ravel())  # a < b: key a * n + b
    if not pair_keys:
        return out
    pair, count = _counted(np.concatenate(pair_keys), n * n)
    keep = count >= min_shared
    pair, count = pair[keep], count[keep]
    a, b = pair // n, pair % n
    src, dst = _by_source_most_shared(np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([count, count]), n)
    first = np.searchsorted(src, np.arange(n))
    rank = np.arange(len(src)) - first[src]
    ok = rank < k
    out[src[ok], rank[ok]] = dst[ok]
    return out


def _by_source_most_shared(src: np.ndarray, dst: np.ndarray, cnt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) ordered by src, then most shared first, then dst: np.lexsort((dst, -cnt, src))
    as one sort of a single int64 key where it fits (2-3x faster on the millions of pairs)."""
    top = int(cnt.max()) + 1 if len(cnt) else 1
    if n * n * top >= 1 << 62:
        order = np.lexsort((dst, -cnt, src))
        return src[order], dst[order]
    key = np.sort((src * top + (top - 1 - cnt)) * n + dst)
    return key // (top * n), key % n


def _counted(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys, their counts): by counting where the key range is small (a pool of a few
    thousand images: n * n counters, no sort), else by one sort, in int32 when every key is
    below 2**31 (the millions of bucket pairs of `descriptor_candidates`: 3x faster than
    np.unique's int64)."""
    if bound <= COUNT_RANGE:
        counts = np.bincount(keys, minlength=bound)
        found = np.flatnonzero(counts)
        return found.astype(np.int64), counts[found]
    keys = keys.astype(np.int32) if bound < 1 << 31 else keys.copy()
    keys.sort()
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[start].astype(np.int64), np.diff(np.r_[start, len(keys)])


def lsh_keys(desc_M32: np.ndarray, pos_TB: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """int64 [M, T]: table t's key of each descriptor, the bits at `pos_TB[t]` (unpackbits
    order: bit p is bit 7 - p % 8 of byte p // 8) read as a number, plus t << B. Built bit by
    bit from the descriptors' byte columns (4x less work than an [M, T, B] int64 product)."""
    tables, bits = pos_TB.shape
    out = np.empty((len(desc_M32), tables), np.int64)
    for s in range(0, len(desc_M32), chunk):
        block, cols = desc_M32[s : s + chunk], {}
        for t in range(tables):
            key = np.zeros(len(block), np.int64)
            for j, p in enumerate(pos_TB[t].tolist()):
                if p // 8 not in cols:
                    cols[p // 8] = block[:, p // 8].astype(np.int64)
                key |= ((cols[p // 8] >> (7 - p % 8)) & 1) << j
            out[s : s + chunk, t] = key
    return out + (np.arange(tables, dtype=np.int64) << bits)


def bounded_candidates(
    n: int,
    hash_pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    knn: list[np.ndarray],
    max_verify: int,
    group: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unique pairs (a < b): each image proposes at most `max_verify` partners, its hash
    candidates first (closest first), then its neighbours of every proposer list, rank by rank.
    Partners with the image's own `group` label (already linked by the hash dedup) are not
    proposed: they would cost a verification and decide nothing."""
    same = (lambda i, j: False) if group is None else (lambda i, j: group[i] == group[j])  # noqa: E731
    props: list[list[int]] = [[] for _ in range(n)]
    ha, hb, hd = hash_pairs
    order = np.argsort(hd, kind="stable")
    for i, j in zip(ha[order].tolist(), hb[order].tolist()):
        if same(i, j):
            continue
        if len(props[i]) < max_verify:
            props[i].append(j)
        if len(props[j]) < max_verify:
            props[j].append(i)
    for rank in range(max((x.shape[1] for x in knn), default=0)):
        for ids in knn:
            if rank >= ids.shape[1]:
                continue
            for i, j in enumerate(ids[:, rank].tolist()):
                if j >= 0 and len(props[i]) < max_verify and j not in props[i] and not same(i, j):
                    props[i].append(j)
    a = np.array([i for i, ps in enumerate(props) for _ in ps], np.int64)
    b = np.array([j for ps in props for j in ps], np.int64)
    a, b = np.minimum(a, b), np.maximum(a, b)
    ok = a != b
    key = sorted_unique(a[ok] * n + b[ok])
    return key // n, key % n


# ---------------------------------------------------------------- calibration


def known_copies(img: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    """One copy per CALIB_KINDS of `img` (RGB), parameters drawn from `rng`."""
    w, h = img.size
    out: dict[str, Image.Image | bytes] = {}
    s = rng.uniform(0.45, 0.7)
    out["resized"] = img.resize((max(32, round(w * s)), max(32, round(h * s))), Image.Resampling.BICUBIC)
    out["jpeg30"] = _jpeg(img, 30)
    side = math.sqrt(0.64)
    cw, ch = round(w * side), round(h * side)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out["crop64"] = img.crop((x0, y0, x0 + cw, y0 + ch))
    out["brighter"] = ImageEnhance.Brightness(img).enhance(rng.uniform(1.25, 1.45))
    out["contrast"] = ImageEnhance.Contrast(img).enhance(rng.uniform(0.55, 0.75))
    out["flipped"] = ImageOps.mirror(img)
    cap = img.copy()
    band = round(h * rng.uniform(0.12, 0.2))
    top = h - band if rng.random() < 0.5 else 0
    draw = ImageDraw.Draw(cap)
    draw.rectangle((0, top, w, top + band), fill=(16, 16, 16))
    draw.text((max(2, w // 20), top + band // 3), "lvd calibration caption 2026", fill=(240, 240, 240))
    out["caption"] = cap
    return {k: v if isinstance(v, bytes) else _jpeg(v, 92) for k, v in out.items()}


def halves(img: Image.Image) -> tuple[bytes, bytes]:
    """The top and bottom halves of `img`: distinct images of one scene. Never the left and
    right halves: those of a mirror-symmetric object (a shirt, a face, a facade) are each
    other's mirror image, a flipped copy by the detector's own definition, and one such pair
    set the threshold for a whole pool (39 inliers where every other distinct pair scored at
    most 14)."""
    w, h = img.size
    return _jpeg(img.crop((0, 0, w, h // 2)), 92), _jpeg(img.crop((0, h - h // 2, w, h)), 92)


def diagonal_quadrants(img: Image.Image) -> list[tuple[bytes, bytes]]:
    """The two diagonal pairs of quadrants of `img`: distinct, and not mirror images either."""
    w, h = img.size
    q = [
        _jpeg(img.crop(box), 92)
        for box in (
            (0, 0, w // 2, h // 2),
            (w - w // 2, h - h // 2, w, h),
            (w - w // 2, 0, w, h // 2),
            (0, h - h // 2, w // 2, h),
        )
    ]
    return [(q[0], q[1]), (q[2], q[3])]


def thirds(img: Image.Image) -> tuple[bytes, bytes]:
    """The top and bottom thirds of `img` (one third apart; top and bottom for the reason
    `halves` gives)."""
    w, h = img.size
    return _jpeg(img.crop((0, 0, w, h // 3)), 92), _jpeg(img.crop((0, h - h // 3, w, h)), 92)


def _jpeg(img: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=q)
    return buf.getvalue()


@dataclass(frozen=True)
class Calibration:
    """The threshold a run used and how it was chosen (also what the Prefect artifact shows)."""

    method: str  # METHOD_LOCAL or METHOD_MODEL
    threshold: float
    source: str  # "calibrated" or "user"
    false_link_rate: float  # target
    false_links: int  # distinct pairs at or above the threshold
    distinct_pairs: int
    recall: dict[str, float]  # per CALIB_KINDS at the threshold
    copy_scores: dict[str, list[float]]
    distinct_scores: list[float]
    images: int

    @property
    def copy_recall(self) -> float:
        scores = np.array([s for v in self.copy_scores.values() for s in v], np.float64)
        return float(np.mean(self.links(scores))) if len(scores) else 0.0

    def links(self, score):
        """Whether `score` (a float or an array) links: inliers >= threshold, cosine > threshold."""
        return score >= self.threshold if self.method == METHOD_LOCAL else score > self.threshold

    def as_dict(self) -> dict:
        return dict(
            method=self.method,
            threshold=self.threshold,
            source=self.source,
            false_link_rate=self.false_link_rate,
            false_links=self.false_links,
            distinct_pairs=self.distinct_pairs,
            recall=self.recall,
            copy_recall=self.copy_recall,
            copy_scores=self.copy_scores,
            distinct_scores=self.distinct_scores,
            images=self.images,
        )

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        d = {k: v for k, v in d.items() if k != "copy_recall"}
        return cls(**d)

    def summary(self) -> str:
        seen = f"{self.false_links} of {self.distinct_pairs} distinct pairs"
        return (
            f"{self.method} threshold {self.threshold:g} ({self.source}): copy recall "
            f"{100 * self.copy_recall:.1f}% on {self.images} pool images' known copies, false links {seen}"
        )


def choose_threshold(method: str, copy_scores: dict[str, list[float]], distinct: list[float], rate: float) -> float:
    """Smallest threshold linking at most `rate` of the distinct pairs (model-free: an integer
    inlier count >= MIN_INLIERS; cosine: the midpoint above the allowed distinct value)."""
    d = np.sort(np.asarray(distinct, np.float64))[::-1]
    allowed = int(math.floor(rate * len(d)))
    hi = d[allowed] if allowed < len(d) else -np.inf
    if method == METHOD_LOCAL:
        return float(max(MIN_INLIERS, (hi + 1) if np.isfinite(hi) else MIN_INLIERS))
    copies = np.array([s for v in copy_scores.values() for s in v], np.float64)
    above = copies[copies > hi]
    if not len(above):
        raise CopyModelUnfit(
            f"no known copy of the pool's images is more similar than its distinct pairs (cosine {hi:.4f}): "
            "this copy model cannot tell copies apart here; use an SSCD model, or drop --copy-model "
            "to use model-free verification"
        )
    return float((hi + above.min()) / 2.0)


class CopyModelUnfit(ValueError):
    """The copy model's calibration found no threshold that separates copies from distinct pairs."""


def calibrate(
    method: str, copy_scores: dict[str, list[float]], distinct: list[float], cfg: CopyDetectConfig, images: int
) -> Calibration:
    if cfg.threshold is not None:
        t, source = float(cfg.threshold), "user"
    else:
        t, source = choose_threshold(method, copy_scores, distinct, cfg.false_link_rate), "calibrated"
    cal = Calibration(
        method=method,
        threshold=t,
        source=source,
        false_link_rate=cfg.false_link_rate,
        false_links=0,
        distinct_pairs=len(distinct),
        recall={},
        copy_scores={k: [float(s) for s in v] for k, v in copy_scores.items()},
        distinct_scores=[float(s) for s in distinct],
        images=images,
    )
    recall = {k: float(np.mean(cal.links(np.asarray(v, np.float64)))) if v else 0.0 for k, v in copy_scores.items()}
    false_links = int(np.sum(cal.links(np.asarray(distinct, np.float64))))
    return replace(cal, recall=recall, false_links=false_links)


def calibration_sample(uids: list[str], m: int, seed: int) -> list[int]:
    """Row positions of a seeded sample of `m` uids, independent of row order."""
    keys = np.array([hash_key(u, seed) for u in uids], np.uint64)
    return sorted(np.argsort(keys, kind="stable")[:m].tolist())


hash_key = uid_hash  # the calibration sample's order (scale.poolorder draws it the same way)


def calibration_pairs(
    blobs: list[bytes], seed: int, copies_of: int | None = None
) -> tuple[dict[str, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]:
    """(kind -> [(original, copy)], [(a, b) distinct]) as encoded images, from sampled blobs;
    known copies of the first `copies_of` blobs only (None: all), distinct pairs of all."""
    from lvd.curation.localfeat import decode_oriented

    copies: dict[str, list[tuple[bytes, bytes]]] = {k: [] for k in CALIB_KINDS}
    distinct: list[tuple[bytes, bytes]] = []
    imgs = []
    for i, data in enumerate(blobs):
        img = decode_oriented(data, 64)
        if max(img.size) > 640:  # known copies of a large photo at calibration cost, not its size
            s = 640 / max(img.size)
            img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.Resampling.BICUBIC)
        imgs.append(img)
        if copies_of is None or i < copies_of:
            orig = _jpeg(img, 92)
            for kind, data_c in known_copies(img, np.random.default_rng([seed, i])).items():
                copies[kind].append((orig, data_c))
        distinct.append(halves(img))
        distinct += diagonal_quadrants(img)
        distinct.append(thirds(img))
    return copies, distinct


# ---------------------------------------------------------------- decisions


def verify_pairs(feats: list[Features], a: np.ndarray, b: np.ndarray, cfg: VerifyConfig, enough: int) -> np.ndarray:
    """int [E]: verified scores of pairs (a[i], b[i])."""
    return np.array(
        [verify(feats[i], feats[j], cfg, enough=enough).score(cfg) for i, j in zip(a.tolist(), b.tolist())], np.int64
    )


@dataclass
class Split:
    edges_a: np.ndarray  # member rows
    edges_b: np.ndarray  # their centre rows
    components_split: int  # components that were not stars and were split
    extra_checks: int  # pairs decided during splitting
    unresolved: int  # members left alone after max_centres tries


def split_chains(
    n: int,
    a: np.ndarray,
    b: np.ndarray,
    rank: np.ndarray,
    linked: Callable[[int, int], bool],
    max_centres: int,
    group: np.ndarray | None = None,
) -> Split:
    """Star components from linked pairs, so that no link goes through a third image.

    Rows with one `group` label (the hash dedup's groups: resized / recompressed versions of
    one image, verified by their own stricter rule) form one unit, led by its best-ranked row.
    Per connected component, units (largest first, then in `rank` order) join the first centre
    unit that their leader has a decided edge with (with any member of the centre unit, or any
    member of theirs with the centre's leader: a unit's members are versions of one image, and
    its leader may be its JPEG q25 version, which a 40% crop does not match), else whose leader
    `linked` says is linked with theirs; else they become a centre; after `max_centres`
    centres a unit stays alone. Every join is a direct link with the centre unit, never one
    through a third unit. Returns edges member -> unit leader and leader -> centre leader."""
    labels = np.arange(n) if group is None else np.asarray(group)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    uf = UnionFind(n)
    uf.union_edges(a, b)
    roots = uf.roots()
    unit_links = {(min(x, y), max(x, y)) for x, y in zip(labels[a].tolist(), labels[b].tolist()) if x != y}
    decided = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))

    def direct(rows: list[int], centre: list[int]) -> bool:
        """A decided edge between one unit's leader and any member of the other."""
        return any(
            (min(x, y), max(x, y)) in decided
            for x, y in [(rows[0], m) for m in centre] + [(m, centre[0]) for m in rows]
        )

    comps: dict[int, dict[int, list[int]]] = {}
    for i in np.argsort(rank, kind="stable").tolist():
        comps.setdefault(int(roots[i]), {}).setdefault(int(labels[i]), []).append(i)
    ea, eb, split, checks, alone = [], [], 0, 0, 0
    for units in comps.values():
        if sum(len(u) for u in units.values()) < 2:
            continue
        centres: list[int] = []  # unit labels
        # the largest unit (most near-identical versions: the image the others were made from)
        # first, then by the rank of each unit's best row
        ordered = sorted(units.items(), key=lambda kv: -len(kv[1]))
        for lab, rows in ordered:
            ea += rows[1:]
            eb += [rows[0]] * (len(rows) - 1)
            home = None
            tried = centres[:max_centres]
            # centres this unit has a decided link with first; the leaders decide either way
            for c in sorted(tried, key=lambda c: (min(lab, c), max(lab, c)) not in unit_links):
                if direct(rows, units[c]):
                    home = c
                    break
                checks += 1
                if linked(rows[0], units[c][0]):
                    home = c
                    break
            if home is None:
                alone += len(centres) >= max_centres
                centres.append(lab)
            else:
                ea.append(rows[0])
                eb.append(units[home][0])
        split += len(centres) > 1
    return Split(np.array(ea, np.int64), np.array(eb, np.int64), split, checks, alone)


def largest_groups(uids: np.ndarray, a: np.ndarray, b: np.ndarray, top: int = 4, per: int = 8) -> list[list[str]]:
    """uids of the `top` largest components of edges (a, b), up to `per` each (for pictures)."""
    n = len(uids)
    uf = UnionFind(n)
    uf.union_edges(np.asarray(a, np.int64), np.asarray(b, np.int64))
    roots = uf.roots()
    groups: dict[int, list[int]] = {}
    for i in sorted(set(np.concatenate([a, b]).tolist())):
        groups.setdefault(int(roots[i]), []).append(i)
    big = sorted(groups.values(), key=lambda g: (-len(g), g[0]))[:top]
    return [[str(uids[i]) for i in g[:per]] for g in big]
