"""Near-duplicate detection over perceptual hashes, and resolution of duplicate groups.

Two images are near-duplicates when their 64-bit pHashes AND dHashes are within radii, their
256-bit pHashes within `verify_radius`, their aspect ratios agree (`max_aspect_ratio`), and
their 16x16 thumbnails agree cell by cell after a brightness/contrast fit
(`max_thumb_residual`). Each check is there because the others miss something, measured with
every image hashed by the real ingest (benchmarks/dedup_quality.py, 29 real photos with one
copy per kind, 20,000 Fashion-MNIST products upscaled to 64 px):
- 64-bit hashes alone cannot tell products on flat backgrounds apart: radii that find 95% of
  resized copies merge thousands of products (pHash<=4: 4,221); 0/4 finds 55% and merges 6.
- pHash<=8, dHash<=8 and pHash-256<=16 find every recompressed / re-encoded / brightened copy
  and 28/29 resized ones, but still merge 4 products: a tee with and without a pocket or a
  print is within 10-14 bits of pHash-256, closer than resized copies of textured photos
  (brick, star fields: up to 24 bits). pHash-256 <= 8 merges none but finds 76% of resized.
- the thumbnail residual separates them: copies stay <= ~22 gray levels, those products >= 39;
  with 30 nothing merges. Pairs closer still (sleeve detail, pHash-256 18) are kept apart by
  verify_radius 16.
Strong brightness / contrast changes clip, which moves pHash, dHash and the thumbnail fit;
the equalised channel finds those: candidates from the equalised 256-bit pHash (`nphash256`)
and seven codes of the image clipped as if brightened (`cphash256`), checked by an affine fit of
the thumbnails on the cells no saturated pixel touches (`sat16`, `unclipped_residual`): a
brightness / contrast change is affine where it does not clip, a distinct look-alike product
differs locally. Bench dump (benchmarks/dedup_quality.py --bench-dump): brightened copies
92.0 -> 98.6%, 0 of 40,000 Fashion-MNIST products merged. Crops, flips and overlays are for
copy detection (`lvd.curation.copydetect`, a later EdgeSet).
Soft images (small faces, patches, products upscaled) lose pHash-256 / dHash bits to JPEG or
resizing (nothing high-frequency to hash) while the 64-bit pHash and thumbnails hold: the soft
channel links pHash <= 8 pairs whose thumbnails fit by an increasing scale + offset within 7
gray levels (benchmarks/copy_heldout.py, an untuned dump: JPEG q15-40 copies 95.1 -> 100%).
Pairs of near-blank thumbnails take no part in the equalised and soft channels (`min_thumb_spread`).

Structure, per channel ('main', 'clipped', 'equalised', 'soft'): candidate pairs (`candidate_codes`
names each search: column, radius, extra codes) -> `verify_pairs(rows, channel, a, b, cfg)`,
the per-pair check of a list of candidate pairs (rows from `table_rows`) -> `resolve`.
`near_duplicate_edges` runs all four; `table_edges` is it on an ingest table.

Candidates (never all pairs) come from `hamming_pairs.candidate_pairs` on the 256-bit code
(sorted chunk keys: 14 s CPU at 1e6 rows, benchmarks/dedup_scale.py), or on the pHash when
verification is off (Faiss multi-hash); exact, by pigeonhole over disjoint chunks.
Rows equal in every compared field are collapsed first and chained, so a pool with thousands
of blank images does not produce millions of pairs.

Edges from every method (pHash now, embedding copy detection later) are `EdgeSet`s over row
positions of one table; `resolve` unions them and names, for each dropped image, its group's
representative (most pixels, then smallest uid), the method that linked it and a distance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from lvd.curation.hamming_pairs import _multihash_params, candidate_pairs
from lvd.curation.phash import CLIP_FACTORS
from lvd.curation.unionfind import UnionFind, components, representative_rank

DUPLICATES_SCHEMA = pa.schema(
    [("uid", pa.string()), ("duplicate_of", pa.string()), ("method", pa.string()), ("distance", pa.float64())]
)
HASH_BITS = 64
VERIFY_BITS = 256
VERIFY_COLUMN = "phash256"
EQUALISED_COLUMN = "nphash256"
CLIPPED_CODES_COLUMN = "cphash256"  # len(phash.CLIP_FACTORS) more equalised codes per row
SATURATED_COLUMN = "sat16"  # two 256-bit cell masks: light-saturated, dark-saturated
THUMB_COLUMN = "thumb16"
THUMB_CELLS = 256  # 16x16 uint8 cell means (ingest.thumbnail)
CODE_BYTES = VERIFY_BITS // 8
CLIPPED_CODES = len(CLIP_FACTORS)
_QUERY_BATCH = 1 << 16  # pairs per batch of the thumbnail check
# The soft channel tries gamma curves only on pairs whose increasing fit is within this many
# gray levels: the held-out gamma copies it recovers fit within 41 (seeds 101, 202), while ~94%
# of its candidates (distinct look-alike products) are beyond 64, so 15x fewer curve fits.
_CURVE_REACH = 64.0


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    # Defaults measured in benchmarks/dedup_quality.py (module doc): every check below is needed
    # for zero false merges among 20,000 Fashion-MNIST products at >= 95% recall of each kind.
    phash_radius: int = 8  # max pHash Hamming distance (inclusive) of a near-duplicate pair
    dhash_radius: int | None = 8  # max dHash distance; None lets pHash decide alone (not advised)
    max_aspect_ratio: float | None = 1.1  # max ratio of the two aspect ratios (w/h); None: ignore
    # Max distance of the 256-bit pHashes (ingest column `phash256`); None: not checked (then
    # 64-bit radii above 0/4 merge distinct products).
    verify_radius: int | None = 16
    # Max gray-level residual of the 16x16 thumbnails (`thumb16`) after a least-squares
    # brightness/contrast fit, either way round; None: not checked. Copies stay below ~22,
    # products differing by a pocket or a print reach ~39.
    max_thumb_residual: float | None = 30.0
    # A second channel for strong brightness / contrast changes, which clip and so break the
    # checks above. Candidates: pairs whose 256-bit pHashes of the equalised image (ingest
    # column `nphash256`, `phash.stable_equalise`) are within this many bits, or one image's
    # within it of one of the other's clipped codes (`cphash256`: the image brightened
    # x1.1..x1.75, equalised), aspect ratios agreeing. Verified by `unclipped_residual`: the
    # thumbnails must fit affinely on the cells no saturated pixel touches (within
    # `max_unclipped_residual` gray levels, on at least `min_unclipped_cells` cells). Measured
    # (benchmarks/dedup_quality.py --bench-dump): brightened / contrast copies median 1.2, p90
    # 2.8 (the hash-only misses it recovers <= 6.1); the closest distinct Fashion-MNIST
    # products within 24 bits >= 14.4. Radius 24, not 20: a brick wall darkened x0.65 lands at
    # 24 bits. None: off.
    equalised_radius: int | None = 24
    max_unclipped_residual: float = 8.0
    min_unclipped_cells: int = 16
    # Pairs whose plain equalised codes are this close need no residual check: textured JPEG
    # photos fit no better than ~10-12 gray levels (draft-decode and JPEG noise in every cell),
    # and their brightened copies stay within 4-6 bits; distinct Fashion-MNIST products >= 16.
    equalised_sure_radius: int = 8
    # Two more ways a candidate of this channel is linked, both only when the two thumbnails
    # are textured (spread >= `min_thumb_spread`: a near-blank patch fits any curve, and its
    # clipped codes are all-white noise):
    # - a power curve: gamma (and the JPEG of a strong brightness change) bends the gray map,
    #   which the affine check cannot follow, so a pair that fails it is checked again with
    #   one thumbnail raised to each of `fit_gammas` (x -> 255 (x / 255)^g), same limit;
    # - a clipped code: one image's plain code within `clipped_code_sure_radius` bits of one
    #   of the other's clipped codes (the original brightened into clipping as the copy was),
    #   where the copy has too few unclipped cells left to fit (a product on white x1.3+).
    # The soft channel tries the same curves (on all cells, its own limit).
    # Measured on benchmarks/copy_heldout.py's untuned pools (built on --seed 101, then run on
    # 202, 11, 23; README): distinct textured candidates fit a power curve no closer than 8.3
    # and 18.1 gray levels (seeds 101, 202; soft candidates, pHash <= 10: 37.2 and 19.9);
    # plain-vs-clipped codes of distinct textured images were never within 12 bits among
    # 9,900 products. () / None: off.
    fit_gammas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.12, 1.25, 1.4, 1.6, 1.8, 2.0)
    clipped_code_sure_radius: int | None = 8
    # A third channel, for clipping brightness changes: pHash and dHash within their radii,
    # pHash-256 within `clipped_verify_radius`, and the thumbnail residual measured on the cells
    # that are not saturated (< 8 or > 247 gray levels) in either image (at least 64 of them)
    # within `clipped_max_residual`. Clipping moves pHash-256 by 18..28 bits and breaks the
    # linear brightness fit only in saturated cells. The residual limit is tighter than the
    # main channel's: at 18 four of 20,000 Fashion-MNIST products merge, at 14 none
    # (benchmarks/dedup_quality.py). None: off.
    clipped_verify_radius: int | None = 28
    clipped_max_residual: float = 14.0
    # A fourth channel, for soft images (small faces, patches and products upscaled, then JPEG
    # q15-40 or resized): their 256-bit pHash and dHash bits ride on near-zero high frequencies
    # and flip (an untuned dump's LFW patches at q20: pHash-256 34 and 38 bits, dHash 13), while
    # the 64-bit pHash (2-4 bits) and the thumbnails (fit within 2.8-3.2 gray levels) hold.
    # Candidates: 64-bit pHash within `soft_phash_radius`; linked when the thumbnails fit by an
    # increasing scale + offset within `soft_max_residual` gray levels, either way round.
    # Needs the thumbnails (max_thumb_residual set; else off).
    # Distinct Fashion-MNIST products with pHash <= 10 (1.2M pairs among 40,000) fit no better
    # than 14.7 (benchmarks/dedup_quality.py --bench-dump); the limit is half that. (The fit on
    # unclipped cells only, `unclipped_residual`, is no use here: distinct products reach 3.1.)
    # None: off.
    soft_max_residual: float | None = 7.0
    soft_phash_radius: int = 8
    # Thumbnails flatter than this (standard deviation of the 256 cell means, gray levels) take
    # no part in the equalised and soft channels: the equalised codes and affine fits of a
    # near-blank image are noise (two blank patches, light grey and black, had equal all-zero
    # equalised codes and were linked as a sure pair). A pair is kept out when BOTH are this
    # flat: near-blank codes collide with each other, not with a textured image's; a brick wall
    # darkened x0.65 (its fine texture averaged away by the 16x16 cells: 3.1) still pairs with
    # its original (4.8). No single cut separates them: some near-blank LFW patches measure 2-4.
    min_thumb_spread: float = 4.0

    def __post_init__(self):
        if not 0 <= self.phash_radius < HASH_BITS // 2:
            raise ValueError(f"phash_radius={self.phash_radius}: use 0..31 (random hashes differ in ~32 bits)")
        if self.dhash_radius is not None and not 0 <= self.dhash_radius < HASH_BITS // 2:
            raise ValueError(f"dhash_radius={self.dhash_radius}: use 0..31, or None to ignore dHash")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1.0:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio}: use a ratio >= 1.0, or None")
        if self.verify_radius is not None and not 0 <= self.verify_radius < VERIFY_BITS // 2:
            raise ValueError(f"verify_radius={self.verify_radius}: use 0..127 bits of the 256-bit pHash, or None")
        if self.clipped_verify_radius is not None and not 0 <= self.clipped_verify_radius < VERIFY_BITS // 2:
            raise ValueError(f"clipped_verify_radius={self.clipped_verify_radius}: use 0..127 bits, or None")
        if self.equalised_radius is not None and not 0 <= self.equalised_radius < VERIFY_BITS // 2:
            raise ValueError(f"equalised_radius={self.equalised_radius}: use 0..127 bits, or None")
        if self.max_thumb_residual is not None and not 0 <= self.max_thumb_residual <= 255:
            raise ValueError(f"max_thumb_residual={self.max_thumb_residual}: use 0..255 gray levels, or None")
        if not 0 <= self.max_unclipped_residual <= 255:
            raise ValueError(f"max_unclipped_residual={self.max_unclipped_residual}: use 0..255 gray levels")
        if self.equalised_radius is not None and not 0 <= self.equalised_sure_radius <= self.equalised_radius:
            raise ValueError(f"equalised_sure_radius={self.equalised_sure_radius}: use 0..equalised_radius")
        if self.soft_max_residual is not None and not 0 <= self.soft_max_residual <= 255:
            raise ValueError(f"soft_max_residual={self.soft_max_residual}: use 0..255 gray levels, or None")
        if not 0 <= self.soft_phash_radius < HASH_BITS // 2:
            raise ValueError(f"soft_phash_radius={self.soft_phash_radius}: use 0..31")
        if self.clipped_code_sure_radius is not None and not 0 <= self.clipped_code_sure_radius <= 24:
            raise ValueError(f"clipped_code_sure_radius={self.clipped_code_sure_radius}: use 0..24 bits, or None")
        if not all(0.2 <= g <= 5.0 for g in self.fit_gammas):
            raise ValueError(f"fit_gammas={self.fit_gammas}: use powers in 0.2..5, or () for none")
        if not self.min_thumb_spread >= 0:
            raise ValueError(f"min_thumb_spread={self.min_thumb_spread}: use >= 0 gray levels")
        if not 3 <= self.min_unclipped_cells <= THUMB_CELLS:
            raise ValueError(
                f"min_unclipped_cells={self.min_unclipped_cells}: use 3..{THUMB_CELLS} (an affine fit needs 3)"
            )


@dataclass(frozen=True)
class EdgeSet:
    """Undirected edges between row positions of one table, all found by one `method`.

    `distance` is the method's own distance (pHash bits for `phash`, 1 - cosine for
    `embedding`); smaller means more alike.
    """

    method: str
    a: np.ndarray  # int64 [E]
    b: np.ndarray  # int64 [E]
    distance: np.ndarray  # float64 [E]

    def __post_init__(self):
        for name in ("a", "b", "distance"):
            arr = np.asarray(getattr(self, name), dtype=np.float64 if name == "distance" else np.int64)
            object.__setattr__(self, name, arr)
        if not (self.a.ndim == 1 and self.a.shape == self.b.shape == self.distance.shape):
            raise ValueError(
                f"a, b, distance must be 1-D of one length: {self.a.shape}, {self.b.shape}, {self.distance.shape}"
            )
        if not self.method:
            raise ValueError("method must name how the edges were found, e.g. 'phash'")

    def __len__(self) -> int:
        return len(self.a)

    def keep(self, mask: np.ndarray) -> EdgeSet:
        """The edges where `mask` is True (e.g. after a verification step)."""
        return EdgeSet(self.method, self.a[mask], self.b[mask], self.distance[mask])


def near_duplicate_edges(
    phash: np.ndarray,
    dhash: np.ndarray,
    cfg: DedupConfig,
    *,
    aspect: np.ndarray | None = None,
    verify: np.ndarray | None = None,
    thumb: np.ndarray | None = None,
    equalised: np.ndarray | None = None,
    clipped_codes: np.ndarray | None = None,
    saturated: np.ndarray | None = None,
) -> EdgeSet:
    """All pairs (a < b) of rows that are near-duplicates under `cfg`; distance = pHash bits.

    With `cfg.equalised_radius`, `equalised` (uint8 [n, 32], the `nphash256` column) adds the
    brightness / contrast channel, which also needs `thumb` and `saturated` (uint8 [n, 64],
    `sat16`) for its check, and searches `clipped_codes` (uint8 [n, 128], `cphash256`) when
    given; without `equalised` that channel is skipped (`find_near_duplicates` requires the
    columns). The soft channel runs when `cfg.soft_max_residual` and `cfg.max_thumb_residual` are set.

    `aspect` (width / height per row) is needed when `cfg.max_aspect_ratio` is set; `verify`
    (uint8 [n, 32], the 256-bit pHash) when `cfg.verify_radius` is set; `thumb` (uint8 [n, 256])
    when `cfg.max_thumb_residual` is set. With `verify`, the
    index is built on the 256-bit codes (radius `verify_radius`): longer codes make finer
    buckets, so fewer probes than the 64-bit pHash at radius 8.
    """
    rows = _make_rows(
        phash, dhash, cfg, aspect=aspect, verify=verify, thumb=thumb, equalised=equalised,
        clipped_codes=clipped_codes, saturated=saturated,
    )  # fmt: skip
    phash = rows.phash
    first, chain = _collapse_identical(rows, cfg)
    if rows.verify is None:
        a, b = candidate_pairs(phash[first][:, None], cfg.phash_radius)
    else:
        a, b = candidate_pairs(rows.verify[first], cfg.verify_radius)
    a, b = first[a], first[b]
    ok = _agree(a, b, rows, cfg)
    a, b = np.concatenate([chain[0], a[ok]]), np.concatenate([chain[1], b[ok]])
    if cfg.clipped_verify_radius is not None and rows.verify is not None and rows.thumb is not None:
        ca, cb = _clipped_pairs(rows, cfg)
        a, b = np.concatenate([a, ca]), np.concatenate([b, cb])
    if rows.equalised is not None:
        ea, eb = equalised_candidates(rows.equalised, cfg.equalised_radius)
        ok = verify_pairs(rows, "equalised", ea, eb, cfg)
        a, b = np.concatenate([a, ea[ok]]), np.concatenate([b, eb[ok]])
    if cfg.soft_max_residual is not None and rows.thumb is not None:
        sa, sb = candidate_pairs(phash[first][:, None], cfg.soft_phash_radius)
        sa, sb = first[sa], first[sb]
        ok = verify_pairs(rows, "soft", sa, sb, cfg)
        a, b = np.concatenate([a, sa[ok]]), np.concatenate([b, sb[ok]])
    dist = np.bitwise_count(phash[a] ^ phash[b]).astype(np.float64)
    return EdgeSet("phash", np.minimum(a, b), np.maximum(a, b), dist)


def _make_rows(
    phash,
    dhash,
    cfg: DedupConfig,
    *,
    aspect,
    verify=None,
    thumb=None,
    equalised=None,
    clipped_codes=None,
    saturated=None,
):
    phash, dhash = np.asarray(phash, dtype=np.uint64), np.asarray(dhash, dtype=np.uint64)
    if phash.shape != dhash.shape or phash.ndim != 1:
        raise ValueError(f"phash {phash.shape} and dhash {dhash.shape} must be 1-D of one length")
    n = len(phash)
    rows = _Rows(phash, dhash, _log_aspect(aspect, n, cfg), _verify_words(verify, n, cfg), _thumbs(thumb, n, cfg))
    if cfg.equalised_radius is not None and equalised is not None:
        rows = _with_equalised(rows, n, equalised, clipped_codes, thumb, saturated)
    any_thumb = rows.thumb if rows.thumb is not None else rows.eq_thumb
    if any_thumb is not None:  # the equalised and soft channels' flatness guard (min_thumb_spread)
        rows = dataclasses.replace(rows, spread=any_thumb.astype(np.float32).std(axis=1))
    return rows


@dataclass(frozen=True)
class _Rows:
    phash: np.ndarray  # uint64 [n]
    dhash: np.ndarray  # uint64 [n]
    log_aspect: np.ndarray | None  # float64 [n]
    verify: np.ndarray | None  # uint64 [n, 4]: the 256-bit pHash as words
    thumb: np.ndarray | None  # uint8 [n, 256]: 16x16 cell means
    # the equalised channel's: uint64 [n, 1 + CLIPPED_CODES or 1, 4] codes (plain first),
    # thumbnails (given even when max_thumb_residual is None), uint8 [n, 64] saturation masks
    equalised: np.ndarray | None = None
    eq_thumb: np.ndarray | None = None
    saturated: np.ndarray | None = None
    spread: np.ndarray | None = None  # float32 [n]: std of each thumbnail's cells


def _with_equalised(rows: _Rows, n: int, equalised, clipped_codes, thumb, saturated) -> _Rows:
    """`rows` with the equalised channel's arrays, checked (see near_duplicate_edges)."""
    if thumb is None or saturated is None:
        raise ValueError("cfg.equalised_radius is set: pass thumb= and saturated= (sat16) too, or set it to None")
    codes = [_fixed_words(equalised, n, "equalised")[:, None]]
    if clipped_codes is not None:
        clipped = np.ascontiguousarray(clipped_codes, dtype=np.uint8)
        if clipped.shape != (n, CLIPPED_CODES * CODE_BYTES):
            raise ValueError(f"clipped_codes must be uint8 [{n}, {CLIPPED_CODES * CODE_BYTES}], got {clipped.shape}")
        codes.append(clipped.view(np.uint64).reshape(n, CLIPPED_CODES, 4))
    saturated = np.ascontiguousarray(saturated, dtype=np.uint8)
    if saturated.shape != (n, 2 * THUMB_CELLS // 8):
        raise ValueError(f"saturated must be uint8 [{n}, {2 * THUMB_CELLS // 8}], got {saturated.shape}")
    eq_thumb = np.ascontiguousarray(thumb, dtype=np.uint8)
    if eq_thumb.shape != (n, THUMB_CELLS):
        raise ValueError(f"thumb must be uint8 [{n}, {THUMB_CELLS}], got {eq_thumb.shape}")
    return dataclasses.replace(
        rows, equalised=np.concatenate(codes, axis=1), eq_thumb=eq_thumb, saturated=saturated
    )  # fmt: skip


def _log_aspect(aspect: np.ndarray | None, n: int, cfg: DedupConfig) -> np.ndarray | None:
    if cfg.max_aspect_ratio is None:
        return None
    if aspect is None:
        raise ValueError("cfg.max_aspect_ratio is set: pass aspect=width/height, or set max_aspect_ratio=None")
    aspect = np.asarray(aspect, dtype=np.float64)
    if aspect.shape != (n,) or not np.all(aspect > 0):
        raise ValueError(f"aspect must be positive with one value per row ({n},), got shape {aspect.shape}")
    return np.log(aspect)


def _verify_words(verify: np.ndarray | None, n: int, cfg: DedupConfig) -> np.ndarray | None:
    return None if cfg.verify_radius is None else _fixed_words(verify, n, "verify")


def _fixed_words(codes: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """uint64 [n, 4] words of 256-bit codes given as uint8 [n, 32] (`name`: the argument)."""
    if codes is None:
        raise ValueError(f"cfg.{name}_radius is set: pass the {VERIFY_BITS}-bit codes ({name}=), or set it to None")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape != (n, VERIFY_BITS // 8):
        raise ValueError(f"{name} must be uint8 [{n}, {VERIFY_BITS // 8}], got {codes.shape}")
    return codes.view(np.uint64)


def _aspect_ok(log_aspect: np.ndarray, a: np.ndarray, b: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    return np.abs(log_aspect[a] - log_aspect[b]) <= aspect_reach(cfg)


def aspect_reach(cfg: DedupConfig) -> float | None:
    """The largest |log aspect| difference of a pair any channel links: every channel checks
    `_aspect_ok` (and rows collapsed as identical share an aspect bucket narrower than it), so
    a partitioned caller may skip pairs of row sets whose aspects lie further apart. None: no
    aspect check (`max_aspect_ratio=None`)."""
    return None if cfg.max_aspect_ratio is None else math.log(cfg.max_aspect_ratio) + 1e-12


def aspects(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """float64 [n]: width / height, the aspect ratios the aspect check compares (logged)."""
    width, height = np.asarray(width).astype(np.int64), np.asarray(height).astype(np.int64)
    return width / np.maximum(height, 1)


def log_aspects(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """float64 [n]: `_log_aspect`'s values of a table's widths and heights."""
    return np.log(aspects(width, height))


def verify_pairs(rows: _Rows, channel: str, a: np.ndarray, b: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """bool [E]: which candidate pairs (row positions a, b) pass every check of `channel`.

    The per-pair step between a channel's candidates and `resolve`: 'main' (`_agree`),
    'clipped' (`_clipped_ok`), 'equalised' (`_equalised_ok`), 'soft' (`_soft_ok`). `rows` from
    `table_rows`.
    Each check reads the two rows only, so pairs may come from any candidate search."""
    checks = {"main": _agree, "clipped": _clipped_ok, "equalised": _equalised_ok, "soft": _soft_ok}
    if channel not in checks:
        raise ValueError(f"channel {channel!r}: use one of {sorted(checks)}")
    return checks[channel](np.asarray(a, np.int64), np.asarray(b, np.int64), rows, cfg)


def _clipped_pairs(rows: _Rows, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The clipped-brightness channel (DedupConfig.clipped_verify_radius)."""
    a, b = candidate_pairs(rows.verify, cfg.clipped_verify_radius)
    ok = verify_pairs(rows, "clipped", a, b, cfg)
    return a[ok], b[ok]


def _clipped_ok(a, b, rows: _Rows, cfg: DedupConfig) -> np.ndarray:
    ok = np.bitwise_count(rows.verify[a] ^ rows.verify[b]).sum(axis=1) <= cfg.clipped_verify_radius
    ok &= np.bitwise_count(rows.phash[a] ^ rows.phash[b]) <= cfg.phash_radius
    if cfg.dhash_radius is not None:
        ok &= np.bitwise_count(rows.dhash[a] ^ rows.dhash[b]) <= cfg.dhash_radius
    if rows.log_aspect is not None:
        ok &= _aspect_ok(rows.log_aspect, a, b, cfg)
    return _thumbs_fit(ok, a, b, rows.thumb, clipped_thumb_residual, cfg.clipped_max_residual)


def clipped_thumb_residual(
    ta: np.ndarray, tb: np.ndarray, *, lo: int = 8, hi: int = 247, min_cells: int = 64
) -> np.ndarray:
    """`thumb_residual` over the cells unsaturated in both thumbnails (inf when fewer than
    `min_cells`): clipping by a brightness change moves only saturated cells off the fit."""
    xa, xb = ta.astype(np.float32), tb.astype(np.float32)
    m = (xa > lo) & (xa < hi) & (xb > lo) & (xb < hi)
    cnt = np.maximum(m.sum(axis=1, keepdims=True), 1)
    xa = np.where(m, xa - (xa * m).sum(axis=1, keepdims=True) / cnt, 0.0)
    xb = np.where(m, xb - (xb * m).sum(axis=1, keepdims=True) / cnt, 0.0)
    res = np.maximum(_fit_residual(xa, xb), _fit_residual(xb, xa))
    return np.where(m.sum(axis=1) >= min_cells, res, np.inf)


def equalised_candidates(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b, unique) of rows with a code of one within `radius` bits of the other's
    plain code (codes: uint64 [n, k, 4], plain first): the equalised channel's candidates.

    One Faiss multi-hash index (`hamming_pairs`' parameters, exact by pigeonhole) holds all
    n*k codes and only the n plain codes query it: pairs of two clipped codes are never
    formed, and 1/k of the queries of a self-join (12k rows: 33 s -> ~7 s under load)."""
    n, k, w = codes.shape
    nbits = 64 * w
    flat = np.ascontiguousarray(codes).view(np.uint8).reshape(n * k, nbits // 8)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nhash, b, nflip = _multihash_params(radius, n * k, nbits)
    index = faiss.IndexBinaryMultiHash(nbits, nhash, b)
    index.nflip = nflip
    index.add(flat)
    plain = np.ascontiguousarray(flat[::k])
    keys = []
    for start in range(0, n, _QUERY_BATCH):
        lims, _, ids = index.range_search(plain[start : start + _QUERY_BATCH], radius + 1)  # strict <
        q = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        r = ids.astype(np.int64) // k
        keys.append(np.minimum(q, r)[q != r] * n + np.maximum(q, r)[q != r])
    pairs = np.unique(np.concatenate(keys))
    return pairs // n, pairs % n


def _equalised_ok(a, b, rows: _Rows, cfg: DedupConfig) -> np.ndarray:
    ok = _spread_ok(a, b, rows, cfg)
    if rows.log_aspect is not None:
        ok &= _aspect_ok(rows.log_aspect, a, b, cfg)
    plain = rows.equalised[:, 0]
    sure = np.bitwise_count(plain[a] ^ plain[b]).sum(axis=1) <= cfg.equalised_sure_radius
    textured = (rows.spread[a] >= cfg.min_thumb_spread) & (rows.spread[b] >= cfg.min_thumb_spread)
    idx = np.flatnonzero(ok & ~sure)
    for start in range(0, len(idx), _QUERY_BATCH):
        i = idx[start : start + _QUERY_BATCH]
        ta, tb = rows.eq_thumb[a[i]], rows.eq_thumb[b[i]]
        masks = _unclipped_masks(rows.saturated[a[i]], rows.saturated[b[i]])  # once: the curves reuse them
        fit = _unclipped_fit(ta, tb, masks, cfg.min_unclipped_cells) <= cfg.max_unclipped_residual
        curved = textured[i] & ~fit
        if cfg.fit_gammas and curved.any():
            c = np.flatnonzero(curved)
            sub = tuple(m[c] for m in masks)
            res = _power_unclipped_fit(ta[c], tb[c], sub, cfg.fit_gammas, cfg.min_unclipped_cells)
            fit[c] = res <= cfg.max_unclipped_residual
        if cfg.clipped_code_sure_radius is not None and rows.equalised.shape[1] > 1:
            c = np.flatnonzero(textured[i] & ~fit)
            fit[c] = _clipped_code_distance(rows.equalised, a[i][c], b[i][c]) <= cfg.clipped_code_sure_radius
        ok[i] = fit
    return ok


def _clipped_code_distance(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int [E]: the smallest distance of one image's plain equalised code to one of the other's
    clipped codes (`codes`: uint64 [n, 1 + CLIPPED_CODES, 4]), either way round."""
    ab = np.bitwise_count(codes[a, :1] ^ codes[b, 1:]).sum(axis=2).min(axis=1)
    ba = np.bitwise_count(codes[b, :1] ^ codes[a, 1:]).sum(axis=2).min(axis=1)
    return np.minimum(ab, ba)


def _power_unclipped_fit(ta: np.ndarray, tb: np.ndarray, masks, gammas, min_cells: int) -> np.ndarray:
    """float [E]: `unclipped_residual` (its cell sets already unpacked, `_unclipped_masks`)
    after the best of `gammas` applied to `ta` (x -> 255 (x / 255)^g): how far the pair is from
    a gamma curve followed by a brightness / contrast change. 0 and 255 map to themselves, so
    the saturated cells stay the same."""
    x = ta.astype(np.float32) / 255.0
    best = np.full(len(ta), np.inf)
    for g in gammas:
        best = np.minimum(best, _unclipped_fit(255.0 * x**g, tb, masks, min_cells))
    return best


def _spread_ok(a, b, rows: _Rows, cfg: DedupConfig) -> np.ndarray:
    """Not both thumbnails near-blank (DedupConfig.min_thumb_spread)."""
    return (rows.spread[a] >= cfg.min_thumb_spread) | (rows.spread[b] >= cfg.min_thumb_spread)


def _soft_ok(a, b, rows: _Rows, cfg: DedupConfig) -> np.ndarray:
    """The soft channel's check (DedupConfig.soft_max_residual)."""
    ok = np.bitwise_count(rows.phash[a] ^ rows.phash[b]) <= cfg.soft_phash_radius
    ok &= _spread_ok(a, b, rows, cfg)
    if rows.log_aspect is not None:
        ok &= _aspect_ok(rows.log_aspect, a, b, cfg)
    residual = functools.partial(_soft_residual, gammas=cfg.fit_gammas, limit=cfg.soft_max_residual)
    return _thumbs_fit(ok, a, b, rows.thumb, residual, cfg.soft_max_residual)


def _soft_residual(ta: np.ndarray, tb: np.ndarray, gammas, limit: float) -> np.ndarray:
    """`increasing_thumb_residual`, or where that is over `limit` but within `_CURVE_REACH`, the
    best fit after a gamma curve (DedupConfig.fit_gammas; a flat side fails it both ways)."""
    res = increasing_thumb_residual(ta, tb)
    near = np.flatnonzero((res > limit) & (res <= _CURVE_REACH)) if gammas else []
    if len(near):
        res[near] = np.minimum(res[near], power_thumb_residual(ta[near], tb[near], gammas))
    return res


def power_thumb_residual(ta: np.ndarray, tb: np.ndarray, gammas) -> np.ndarray:
    """`increasing_thumb_residual` after the best of `gammas` applied to `ta` (x -> 255 (x / 255)^g)."""
    x = ta.astype(np.float32) / 255.0
    return np.min([increasing_thumb_residual(255.0 * x**g, tb) for g in gammas], axis=0)


def increasing_thumb_residual(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """`thumb_residual`, inf where the fit is not increasing (an inverted image fits by a
    negative scale; no brightness, contrast or codec change does that)."""
    xa, xb = ta.astype(np.float32), tb.astype(np.float32)
    xa -= xa.mean(axis=1, keepdims=True)
    xb -= xb.mean(axis=1, keepdims=True)
    res = np.maximum(_fit_residual(xa, xb), _fit_residual(xb, xa))
    return np.where((xa * xb).sum(axis=1) > 0, res, np.inf)


def unclipped_residual(
    ta: np.ndarray, tb: np.ndarray, sat_a: np.ndarray, sat_b: np.ndarray, *, min_cells: int = 16
) -> np.ndarray:
    """float [E]: how far two thumbnails are from one brightness / contrast change, in gray levels.

    Such a change maps every pixel it does not clip affinely (x -> s*x + o, s > 0), so the
    cell means of cells without a saturated pixel (`sat16`: packed [light | dark] cell masks,
    uint8 [E, 64]) fit affinely both ways; a distinct look-alike differs locally (a strap, a
    sole, a collar), which no affine map explains. The residual (`thumb_residual`'s, on those
    cells) is the smaller of two cell sets: without light-saturated cells (brightening clips
    only the top; dark cells keep their support) and without any saturated cell (contrast clips
    both ends). inf where a set has fewer than `min_cells` cells or the fit is not increasing.
    """
    return _unclipped_fit(ta, tb, _unclipped_masks(sat_a, sat_b), min_cells)


def _unclipped_masks(sat_a: np.ndarray, sat_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`unclipped_residual`'s two cell sets: no light-saturated cell, no saturated cell."""
    light = np.unpackbits(sat_a[:, :32], axis=1) | np.unpackbits(sat_b[:, :32], axis=1)
    dark = np.unpackbits(sat_a[:, 32:], axis=1) | np.unpackbits(sat_b[:, 32:], axis=1)
    return light == 0, (light | dark) == 0


def _unclipped_fit(ta: np.ndarray, tb: np.ndarray, masks, min_cells: int) -> np.ndarray:
    best = np.full(len(ta), np.inf)
    for m in masks:
        best = np.minimum(best, _masked_fit_residual(ta, tb, m, min_cells))
    return best


def _masked_fit_residual(ta: np.ndarray, tb: np.ndarray, m: np.ndarray, min_cells: int) -> np.ndarray:
    xa, xb = ta.astype(np.float32), tb.astype(np.float32)
    cnt = np.maximum(m.sum(axis=1, keepdims=True), 1)
    xa = np.where(m, xa - (xa * m).sum(axis=1, keepdims=True) / cnt, 0.0)
    xb = np.where(m, xb - (xb * m).sum(axis=1, keepdims=True) / cnt, 0.0)
    res = np.maximum(_fit_residual(xa, xb), _fit_residual(xb, xa))
    increasing = (xa * xb).sum(axis=1) > 0
    return np.where((m.sum(axis=1) >= min_cells) & increasing, res, np.inf)


def _thumbs(thumb: np.ndarray | None, n: int, cfg: DedupConfig) -> np.ndarray | None:
    if cfg.max_thumb_residual is None:
        return None
    if thumb is None:
        raise ValueError("cfg.max_thumb_residual is set: pass the 16x16 thumbnails (thumb=), or set it to None")
    thumb = np.ascontiguousarray(thumb, dtype=np.uint8)
    if thumb.shape != (n, THUMB_CELLS):
        raise ValueError(f"thumb must be uint8 [{n}, {THUMB_CELLS}], got {thumb.shape}")
    return thumb


def _collapse_identical(rows: _Rows, cfg: DedupConfig):
    """Group rows equal in every compared field; chain each group to its first row.

    Returns (first row of each group, (chain_a, chain_b)). Equal hashes are distance 0 and the
    aspect bucket is narrower than the tolerance, so chained rows are near-duplicates, and any
    other row matches a member iff it matches the first: only first rows go into the index.
    """
    keys = [rows.phash, rows.dhash]
    if rows.log_aspect is not None:  # ratio 1.0: only equal aspects may chain
        width = math.log(cfg.max_aspect_ratio)
        keys.append(np.floor(rows.log_aspect / width).astype(np.int64) if width > 0 else rows.log_aspect.view(np.int64))
    keys = [k.view(np.uint8).reshape(len(rows.phash), -1) for k in keys]
    keys += [x.view(np.uint8).reshape(len(rows.phash), -1) for x in (rows.verify, rows.thumb) if x is not None]
    # one byte string per row: a single memcmp sort, ~4x faster than lexsort over 40 key columns
    packed = np.ascontiguousarray(np.concatenate(keys, axis=1))
    _, first, group = np.unique(
        packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), return_index=True, return_inverse=True
    )
    chained = np.ones(len(group), dtype=bool)
    chained[first] = False  # np.unique's index is each group's smallest row
    members = np.flatnonzero(chained)
    return first, (first[group.ravel()[members]], members)


def _agree(a, b, rows: _Rows, cfg: DedupConfig) -> np.ndarray:
    """Every criterion of `cfg` on candidate pairs (the index checked only one of them)."""
    ok = np.bitwise_count(rows.phash[a] ^ rows.phash[b]) <= cfg.phash_radius
    if cfg.dhash_radius is not None:
        ok &= np.bitwise_count(rows.dhash[a] ^ rows.dhash[b]) <= cfg.dhash_radius
    if rows.log_aspect is not None:
        ok &= _aspect_ok(rows.log_aspect, a, b, cfg)
    if rows.verify is not None:
        ok &= np.bitwise_count(rows.verify[a] ^ rows.verify[b]).sum(axis=1) <= cfg.verify_radius
    if rows.thumb is not None:  # last: costs 256 cells per pair, so only on survivors
        ok = _thumbs_fit(ok, a, b, rows.thumb, thumb_residual, cfg.max_thumb_residual)
    return ok


def _thumbs_fit(ok: np.ndarray, a, b, thumb: np.ndarray, residual, limit: float) -> np.ndarray:
    """`ok` narrowed to the pairs whose thumbnails fit within `limit` by `residual`, computed on
    the survivors only (256 cells per pair), _QUERY_BATCH pairs at a time."""
    idx = np.flatnonzero(ok)
    for start in range(0, len(idx), _QUERY_BATCH):
        i = idx[start : start + _QUERY_BATCH]
        ok[i] = residual(thumb[a[i]], thumb[b[i]]) <= limit
    return ok


def thumb_residual(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """float [E]: max |residual| (gray levels) of the least-squares fit of one thumbnail by the
    other (scale and offset: brightness and contrast changes fit away), worse of both ways."""
    xa, xb = ta.astype(np.float32), tb.astype(np.float32)
    xa -= xa.mean(axis=1, keepdims=True)
    xb -= xb.mean(axis=1, keepdims=True)
    return np.maximum(_fit_residual(xa, xb), _fit_residual(xb, xa))


def _fit_residual(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    var = (x * x).sum(axis=1)
    slope = (x * y).sum(axis=1) / np.maximum(var, 1e-6)
    return np.abs(y - slope[:, None] * x).max(axis=1)


def resolve(uids, pixels, edge_sets: list[EdgeSet]) -> pa.Table:
    """Union all edges; one row per non-representative image of every group (DUPLICATES_SCHEMA).

    Rows: `duplicate_of` is the group's representative (most pixels, then smallest uid).
    `method` is the first method, in `edge_sets` order, among the image's own edges, and
    `distance` the smallest distance among its edges of that method: how close the image is to
    the group member that tied it in (not necessarily the representative). Output is sorted by
    uid and independent of row order. uids must be unique.
    """
    uids = np.asarray(uids, dtype=object)
    pixels = np.asarray(pixels, dtype=np.int64)
    if uids.shape != pixels.shape or uids.ndim != 1:
        raise ValueError(f"uids {uids.shape} and pixels {pixels.shape} must be 1-D of one length")
    for es in edge_sets:
        if len(es) and (min(es.a.min(), es.b.min()) < 0 or max(es.a.max(), es.b.max()) >= len(uids)):
            raise ValueError(f"edge set '{es.method}' has row positions outside 0..{len(uids) - 1}")
    ends = [np.concatenate([es.a, es.b]) for es in edge_sets]
    touched = np.unique(np.concatenate(ends)) if ends else np.zeros(0, np.int64)
    if len(touched) == 0:
        return DUPLICATES_SCHEMA.empty_table()
    local = [(np.searchsorted(touched, es.a), np.searchsorted(touched, es.b)) for es in edge_sets]
    uf = UnionFind(len(touched))
    for la, lb in local:
        uf.union_edges(la, lb)
    t_uids = uids[touched]
    if len(set(t_uids.tolist())) != len(t_uids):
        raise ValueError("uids must be unique (exact copies are resolved by the ledger)")
    comps = components(uf, representative_rank(pixels[touched], t_uids))
    rep = comps.representative_of()
    method_idx, distance = _linking_edge(local, edge_sets, len(touched))
    members = np.flatnonzero(rep != np.arange(len(touched)))
    methods = np.array([es.method for es in edge_sets], dtype=object)
    table = pa.table(
        {
            "uid": pa.array(t_uids[members].tolist(), pa.string()),
            "duplicate_of": pa.array(t_uids[rep[members]].tolist(), pa.string()),
            "method": pa.array(methods[method_idx[members]].tolist(), pa.string()),
            "distance": pa.array(distance[members], pa.float64()),
        },
        schema=DUPLICATES_SCHEMA,
    )
    return table.sort_by([("uid", "ascending")])


def _linking_edge(local, edge_sets, n) -> tuple[np.ndarray, np.ndarray]:
    """Per node: (index of the first method among its edges, smallest distance of that method)."""
    node = np.concatenate([np.concatenate([la, lb]) for la, lb in local])
    prio = np.concatenate([np.full(2 * len(es), i) for i, es in enumerate(edge_sets)])
    dist = np.concatenate([np.concatenate([es.distance, es.distance]) for es in edge_sets])
    order = np.lexsort((dist, prio, node))
    first = np.ones(len(order), dtype=bool)
    first[1:] = node[order][1:] != node[order][:-1]
    pick = order[first]
    method_idx, distance = np.zeros(n, np.int64), np.zeros(n, np.float64)
    method_idx[node[pick]], distance[node[pick]] = prio[pick], dist[pick]
    return method_idx, distance


def find_near_duplicates(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    """pHash near-duplicates of a table with uid, width, height, phash, dhash (unique uids)."""
    missing = {"uid", "width", "height", "phash", "dhash"} - set(table.column_names)
    if missing:
        raise ValueError(f"dedup needs columns {sorted(missing)} (from the ingest manifest)")
    cols = {c: table[c] for c in ("uid", "width", "height", "phash", "dhash")}
    nulls = [c for c, col in cols.items() if col.null_count]
    if nulls:
        raise ValueError(f"columns {nulls} have nulls: pass accepted records only")
    width = cols["width"].to_numpy().astype(np.int64)
    height = cols["height"].to_numpy().astype(np.int64)
    edges = near_duplicate_edges(cols["phash"].to_numpy(), cols["dhash"].to_numpy(), cfg, **_code_arrays(table, cfg))
    return resolve(cols["uid"].to_numpy(zero_copy_only=False), width * height, [edges])


def _code_arrays(table: pa.Table, cfg: DedupConfig) -> dict:
    """near_duplicate_edges' keyword arrays from an ingest table (the columns `cfg` reads)."""
    out = dict(aspect=aspects(table["width"].to_numpy(), table["height"].to_numpy()))
    if cfg.verify_radius is not None:
        out["verify"] = _fixed_width(table, VERIFY_COLUMN, CODE_BYTES)
    if cfg.max_thumb_residual is not None or cfg.equalised_radius is not None:
        out["thumb"] = _fixed_width(table, THUMB_COLUMN, THUMB_CELLS)
    if cfg.equalised_radius is not None:
        out["equalised"] = _fixed_width(table, EQUALISED_COLUMN, CODE_BYTES)
        out["clipped_codes"] = _fixed_width(table, CLIPPED_CODES_COLUMN, CLIPPED_CODES * CODE_BYTES)
        out["saturated"] = _fixed_width(table, SATURATED_COLUMN, 2 * THUMB_CELLS // 8)
    return out


def _fixed_width(table: pa.Table, name: str, nbytes: int) -> np.ndarray:
    """uint8 [n, nbytes] from a binary column written by ingest."""
    what = {
        VERIFY_COLUMN: "verify_radius=None",
        THUMB_COLUMN: "max_thumb_residual=None",
        EQUALISED_COLUMN: "equalised_radius=None",
        CLIPPED_CODES_COLUMN: "equalised_radius=None",
        SATURATED_COLUMN: "equalised_radius=None",
    }[name]
    if name not in table.column_names:
        raise ValueError(
            f"dedup needs the ingest column '{name}' (added to INGEST_SCHEMA with it): re-run ingest "
            f"with this lvd version, pass the column through, or set {what} (fewer copies found)"
        )
    col = table[name]
    if col.null_count:
        raise ValueError(f"column '{name}' has nulls: pass accepted records only")
    data = b"".join(col.to_pylist())
    if len(data) != table.num_rows * nbytes:
        raise ValueError(f"column '{name}' must hold {nbytes} bytes per row")
    return np.frombuffer(data, np.uint8).reshape(table.num_rows, nbytes)


# ---------------------------------------------------------------- for partitioned callers


@dataclass(frozen=True)
class CandidateCode:
    """One exact candidate search of `near_duplicate_edges`: pairs within `radius` bits of the
    ingest column `column` are compared by channel `channel`."""

    channel: str
    column: str
    radius: int
    # A column of more codes per row (CODE_BYTES each): pairs where one of them is within
    # `radius` of the other row's `column` code are candidates too (equalised channel:
    # `cphash256`, see `equalised_candidates`). None: `column` against `column` only.
    variants: str | None = None


def candidate_codes(cfg: DedupConfig) -> list[CandidateCode]:
    """The candidate searches that find every pair `near_duplicate_edges` links under `cfg`.

    Every pair it links is within `radius` bits of `column` for one entry whose `channel`
    links it, so a caller that buckets rows by these codes (pigeonhole,
    `lvd.curation.scale.hashdedup`) and checks them by `verify_pairs` sees every pair.
    'main' and 'clipped' link only pairs within `phash_radius` of the 64-bit pHash (`_agree`,
    `_clipped_ok`), so when 'soft' searches the pHash at least that far, they are searched
    there too, not on the 256-bit pHash at 16 / 28 bits: one search of the three (the
    partitioned dedup 1.3-1.4x faster at 10^5-10^6, README "Partitioned hash dedup"). The
    single process keeps its own searches (`near_duplicate_edges`); the pairs it links are
    the same."""
    soft = cfg.soft_max_residual is not None and cfg.max_thumb_residual is not None
    if soft and cfg.soft_phash_radius >= cfg.phash_radius:
        on_verify = ("phash", cfg.soft_phash_radius)
    else:
        on_verify = None  # each searched on the code its own radius bounds most tightly
    if cfg.verify_radius is not None:
        out = [CandidateCode("main", *(on_verify or (VERIFY_COLUMN, cfg.verify_radius)))]
    else:
        out = [CandidateCode("main", "phash", cfg.phash_radius)]
    if cfg.clipped_verify_radius is not None and cfg.verify_radius is not None and cfg.max_thumb_residual is not None:
        out.append(CandidateCode("clipped", *(on_verify or (VERIFY_COLUMN, cfg.clipped_verify_radius))))
    if cfg.equalised_radius is not None:
        out.append(CandidateCode("equalised", EQUALISED_COLUMN, cfg.equalised_radius, CLIPPED_CODES_COLUMN))
    if soft:
        out.append(CandidateCode("soft", "phash", cfg.soft_phash_radius))
    return out


def table_edges(table: pa.Table, cfg: DedupConfig) -> EdgeSet:
    """`near_duplicate_edges` of a table with `find_near_duplicates`'s columns (rows: positions)."""
    return near_duplicate_edges(table["phash"].to_numpy(), table["dhash"].to_numpy(), cfg, **_code_arrays(table, cfg))


def table_rows(table: pa.Table, cfg: DedupConfig) -> _Rows:
    """The rows `verify_pairs` checks, from a table with `find_near_duplicates`'s columns."""
    return _make_rows(table["phash"].to_numpy(), table["dhash"].to_numpy(), cfg, **_code_arrays(table, cfg))
