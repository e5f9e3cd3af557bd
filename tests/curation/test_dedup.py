"""Near-duplicate edges against brute force, resolve semantics, and real-image quality."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from _images import jpeg, lfw, png
from PIL import Image, ImageEnhance

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos
from lvd.curation.dedup import (
    THUMB_CELLS,
    DedupConfig,
    EdgeSet,
    equalised_candidates,
    find_near_duplicates,
    increasing_thumb_residual,
    near_duplicate_edges,
    resolve,
    thumb_residual,
    unclipped_residual,
)  # fmt: skip
from lvd.curation.ingest import INGEST_SCHEMA, IngestConfig, ingest_item
from lvd.curation.phash import CLIP_FACTORS, brightness_codes, saturation_masks, stable_equalise
from lvd.curation.sources import RawItem
from lvd.datasets import load_fashion_mnist

HASH64 = dict(
    verify_radius=None, max_thumb_residual=None, equalised_radius=None, clipped_verify_radius=None
)  # 64-bit hashes only (synthetic tests)
NOASPECT = dict(max_aspect_ratio=None, **HASH64)


def _flip(x: np.uint64, nbits: int, rng) -> np.uint64:
    mask = 0
    for bit in rng.choice(64, size=nbits, replace=False).tolist():
        mask |= 1 << bit
    return np.uint64(int(x) ^ mask)


def _planted(n: int, seed: int, dists: list[tuple[int, int]]):
    """Random hashes plus one planted partner per (pHash bits, dHash bits) in `dists`."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    d = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    extra_p = [_flip(p[i], dp, rng) for i, (dp, _) in enumerate(dists)]
    extra_d = [_flip(d[i], dd, rng) for i, (_, dd) in enumerate(dists)]
    return np.concatenate([p, extra_p]).astype(np.uint64), np.concatenate([d, extra_d]).astype(np.uint64)


def _brute_force(p, d, cfg) -> set[tuple[int, int]]:
    dp = np.bitwise_count(p[:, None] ^ p[None])
    dd = np.bitwise_count(d[:, None] ^ d[None])
    ok = dp <= cfg.phash_radius
    if cfg.dhash_radius is not None:
        ok &= dd <= cfg.dhash_radius
    a, b = np.nonzero(np.triu(ok, 1))
    return set(zip(a.tolist(), b.tolist()))


@pytest.mark.parametrize("r1,r2", [(0, 4), (4, 4), (8, 6), (12, None)])
def test_edges_equal_brute_force_at_and_beyond_radius(r1, r2):
    cfg = DedupConfig(phash_radius=r1, dhash_radius=r2, **NOASPECT)
    r2v = 64 if r2 is None else r2
    at = [(r1, min(r2v, 20))] * 3
    outside = [(r1 + 1, 0)] * 3 + ([(0, r2v + 1)] * 3 if r2 is not None else [])
    p, d = _planted(3000, seed=r1, dists=at + outside + [(max(r1 - 1, 0), 0)] * 3)
    es = near_duplicate_edges(p, d, cfg)
    got = set(zip(es.a.tolist(), es.b.tolist()))
    want = _brute_force(p, d, cfg)
    assert got == want
    n = 3000
    assert {(i, n + i) for i in range(3)} <= got  # planted exactly at the radius: found
    assert not {(i, n + i) for i in range(3, 3 + len(outside))} & got  # one bit outside: not found
    assert np.array_equal(es.distance, np.bitwise_count(p[es.a] ^ p[es.b]).astype(float))


def test_verified_edges_equal_brute_force_and_ignore_row_order():
    rng = np.random.default_rng(11)
    n, cfg = (
        1500,
        DedupConfig(phash_radius=8, dhash_radius=8, verify_radius=16, max_aspect_ratio=None, max_thumb_residual=None),
    )
    p, d = _planted(n, seed=11, dists=[(8, 8)] * 6 + [(0, 0)] * 6)
    v = rng.integers(0, 256, (len(p), 32), dtype=np.uint8)
    for i in range(12):  # partners: 6 within 16 bits of the 256-bit code, 6 just outside
        flips = rng.choice(256, size=16 if i < 6 else 17, replace=False)
        bits = np.unpackbits(v[i])
        bits[flips] ^= 1
        v[n + i] = np.packbits(bits)
    p[20:23], d[20:23] = p[19], d[19]  # equal 64-bit hashes, distinct 256-bit codes
    v[21] = v[19]
    words = v.view(np.uint64)
    want = {(a, b) for a, b in _brute_force(p, d, cfg) if np.bitwise_count(words[a] ^ words[b]).sum() <= 16}
    es = near_duplicate_edges(p, d, cfg, verify=v)
    got = set(zip(es.a.tolist(), es.b.tolist()))
    assert got == want and (19, 21) in got and (19, 20) not in got
    assert {(i, n + i) for i in range(6)} <= got and not {(i, n + i) for i in range(6, 12)} & got
    perm = rng.permutation(len(p))
    es2 = near_duplicate_edges(p[perm], d[perm], cfg, verify=v[perm])
    assert {tuple(sorted((perm[a], perm[b]))) for a, b in zip(es2.a.tolist(), es2.b.tolist())} == got


def test_identical_hashes_are_chained_not_all_pairs():
    p = np.full(500, 12345, np.uint64)
    d = np.full(500, 678, np.uint64)
    es = near_duplicate_edges(p, d, DedupConfig(**NOASPECT))
    assert len(es) == 499 and np.all(es.distance == 0)
    t = find_near_duplicates(
        _table([f"u{i:03d}" for i in range(500)], p, d, w=[10] * 500, h=[10] * 500), DedupConfig(**HASH64)
    )
    assert t.num_rows == 499 and set(t["duplicate_of"].to_pylist()) == {"u000"}


def test_aspect_ratio_guard():
    p = np.array([1, 1, 1], np.uint64)
    d = np.array([2, 2, 2], np.uint64)
    aspect = np.array([1.0, 1.05, 2.0])
    es = near_duplicate_edges(p, d, DedupConfig(max_aspect_ratio=1.1, **HASH64), aspect=aspect)
    assert set(zip(es.a.tolist(), es.b.tolist())) == {(0, 1)}
    strict = near_duplicate_edges(p, d, DedupConfig(max_aspect_ratio=1.0, **HASH64), aspect=np.array([1.0, 1.05, 1.0]))
    assert set(zip(strict.a.tolist(), strict.b.tolist())) == {(0, 2)}
    with pytest.raises(ValueError, match="aspect"):
        near_duplicate_edges(p, d, DedupConfig(**HASH64))


def _table(uids, p, d, *, w, h, **extra) -> pa.Table:
    cols = dict(uid=uids, width=pa.array(w, pa.int32()), height=pa.array(h, pa.int32()),
                phash=pa.array(p, pa.uint64()), dhash=pa.array(d, pa.uint64()), **extra)  # fmt: skip
    return pa.table(cols)


def test_resolve_representative_method_and_distance():
    uids = ["e", "d", "c", "b", "a"]
    pixels = [100, 400, 400, 100, 100]
    ph = EdgeSet("phash", [0, 1, 3], [1, 2, 4], [3.0, 2.0, 0.0])  # {e,d,c} and {b,a}
    emb = EdgeSet("embedding", [0, 2], [4, 1], [0.1, 0.2])  # joins a to e; extra d-c edge
    t = resolve(uids, pixels, [ph, emb]).to_pylist()
    # rep = most pixels, then smallest uid: c (400) over d (400); everyone joins one group
    assert t == [
        {"uid": "a", "duplicate_of": "c", "method": "phash", "distance": 0.0},
        {"uid": "b", "duplicate_of": "c", "method": "phash", "distance": 0.0},
        {"uid": "d", "duplicate_of": "c", "method": "phash", "distance": 2.0},
        {"uid": "e", "duplicate_of": "c", "method": "phash", "distance": 3.0},
    ]
    only_emb = resolve(uids, pixels, [EdgeSet("embedding", [0], [4], [0.25])]).to_pylist()
    assert only_emb == [{"uid": "e", "duplicate_of": "a", "method": "embedding", "distance": 0.25}]
    assert resolve(uids, pixels, []).num_rows == 0


def test_find_near_duplicates_is_order_independent():
    p, d = _planted(2000, seed=5, dists=[(0, 2), (0, 4), (0, 0), (2, 0)] * 10)
    n = len(p)
    rng = np.random.default_rng(0)
    p[5], d[5] = p[0], d[0]  # a group of three with chained edges
    uids = [f"{i:05d}" for i in rng.permutation(n)]
    w = rng.integers(64, 80, n).tolist()
    t = _table(uids, p, d, w=w, h=w)
    cfg = DedupConfig(phash_radius=0, dhash_radius=4, **HASH64)
    base = find_near_duplicates(t, cfg)
    assert base.num_rows >= 30
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        assert find_near_duplicates(t.take(perm), cfg).equals(base)


def _reference_residual(ta, tb) -> float:
    """Trusted reference: lstsq fit of each thumbnail by the other, worst cell, worse way."""
    worst = 0.0
    for x, y in ((ta, tb), (tb, ta)):
        design = np.stack([x.astype(float), np.ones(len(x))], axis=1)
        coef, *_ = np.linalg.lstsq(design, y.astype(float), rcond=None)
        worst = max(worst, float(np.abs(design @ coef - y).max()))
    return worst


def test_thumb_residual_fits_brightness_and_contrast_away():
    rng = np.random.default_rng(3)
    a = rng.integers(20, 120, (4, THUMB_CELLS)).astype(np.uint8)
    b = (2 * a.astype(int) + 10).astype(np.uint8)  # contrast x2, brightness +10: fits exactly
    assert np.allclose(thumb_residual(a, b), 0, atol=1e-3)
    c = a.copy()
    c[:, 0] += 40  # one cell (a pocket) brighter by 40 levels
    got = thumb_residual(a, c)
    want = [_reference_residual(a[i], c[i]) for i in range(4)]
    assert np.allclose(got, want, atol=1e-2) and np.all(got > 35)
    assert np.allclose(thumb_residual(a, c), thumb_residual(c, a))  # symmetric


def test_verified_edges_with_thumbs_equal_brute_force():
    rng = np.random.default_rng(4)
    n, cfg = 400, DedupConfig(phash_radius=6, dhash_radius=6, verify_radius=12, max_thumb_residual=20.0)
    p, d = _planted(n, seed=4, dists=[(2, 2)] * 20)
    v = rng.integers(0, 256, (len(p), 32), dtype=np.uint8)
    v[n:] = v[:20]  # partners: equal 256-bit pHash
    thumbs = rng.integers(0, 200, (len(p), THUMB_CELLS)).astype(np.uint8)
    thumbs[n:] = thumbs[:20] + rng.integers(0, 3, (20, THUMB_CELLS)).astype(np.uint8)  # small noise
    thumbs[n : n + 10, :8] += np.arange(10, dtype=np.uint8)[:, None] * 8  # local change 0..72 levels
    p[[7, 8]], d[[7, 8]], v[[7, 8]] = p[6], d[6], v[6]  # equal hashes, distinct thumbs: no chaining
    aspect = np.ones(len(p))
    es = near_duplicate_edges(p, d, cfg, aspect=aspect, verify=v, thumb=thumbs)
    words = v.view(np.uint64)
    want = {
        (i, j) for i, j in _brute_force(p, d, cfg)
        if np.bitwise_count(words[i] ^ words[j]).sum() <= 12 and _reference_residual(thumbs[i], thumbs[j]) <= 20.0
    }  # fmt: skip
    got = set(zip(es.a.tolist(), es.b.tolist()))
    assert got == want
    assert {(i, n + i) for i in range(10, 20)} <= got  # noise only: kept
    assert not {(i, n + i) for i in range(3, 10)} & got  # local change >= 24 levels: refused
    assert (6, 7) not in got and (6, 8) not in got


def test_config_validation_messages():
    with pytest.raises(ValueError, match="phash_radius=40"):
        DedupConfig(phash_radius=40)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        DedupConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="max_thumb_residual=300"):
        DedupConfig(max_thumb_residual=300)
    with pytest.raises(ValueError, match="'phash256'.*re-run ingest"):
        find_near_duplicates(_table(["a"], [1], [1], w=[1], h=[1]), DedupConfig())
    no_thumb = _table(["a"], [1], [1], w=[1], h=[1], phash256=pa.array([bytes(32)], pa.binary(32)))
    with pytest.raises(ValueError, match="'thumb16'.*max_thumb_residual=None"):
        find_near_duplicates(no_thumb, DedupConfig())


# ---- real images through the real ingest -------------------------------------------------


def _pool(items: list[tuple[str, bytes]]) -> pa.Table:
    """The columns dedup reads, exactly as the real ingest writes them."""
    rows = []
    for uid, data in items:
        rec, _ = ingest_item(RawItem(uid, data, None), IngestConfig())
        assert rec["status"] == "accepted", (uid, rec["reason"])
        rows.append(rec)
    return (
        pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
        .drop_columns(["uid"])
        .add_column(0, "uid", pa.array([uid for uid, _ in items], pa.string()))
    )


@pytest.fixture(scope="module")
def photo_pool() -> pa.Table:
    items = []
    for seed, (name, img) in enumerate(real_photos(crops=True)):
        items.append((f"{name}:orig", encode_original(img)))
        items += [(f"{name}:{kind}", data) for kind, data in make_copies(img, seed=seed).items()]
    return _pool(items)


def _groups(table: pa.Table, dups: pa.Table) -> dict[str, str]:
    rep = {u: u for u in table["uid"].to_pylist()}
    rep.update(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    return rep


HASH_KINDS = [k for k in COPY_KINDS if k != "cropped"]  # crops need embedding copy detection


def _recall(rep: dict[str, str], kind: str) -> tuple[float, list[str]]:
    copies = [u for u in rep if u.split(":")[1] == kind]
    missed = [u for u in copies if rep[u] != rep[u.split(":")[0] + ":orig"]]
    return 1 - len(missed) / len(copies), missed


def _no_originals_merged(rep: dict[str, str]) -> None:
    originals = [u for u in rep if u.endswith(":orig")]
    assert len({rep[u] for u in originals}) == len(originals)


def test_defaults_group_real_copies_and_keep_distinct_photos(photo_pool):
    """The issue's bar on the real photos through real ingest: exact copies all found, every
    other hash-detectable kind >= 95%, no two distinct photos merged. Measured: one resized
    copy (of 29) is missed; a second miss in any kind would fail here."""
    rep = _groups(photo_pool, find_near_duplicates(photo_pool, DedupConfig()))
    assert _recall(rep, "exact") == (1.0, [])
    for kind in HASH_KINDS:
        recall, missed = _recall(rep, kind)
        assert recall >= 0.95 and len(missed) <= 1, (kind, missed)
    for kind in ("recompressed", "reencoded", "brightened"):
        assert _recall(rep, kind)[1] == [], kind
    _no_originals_merged(rep)


def test_strict_64bit_setting_finds_exact_copies_only_reliably(photo_pool):
    rep = _groups(photo_pool, find_near_duplicates(photo_pool, DedupConfig(phash_radius=0, dhash_radius=4, **HASH64)))
    assert _recall(rep, "exact") == (1.0, [])
    assert _recall(rep, "resized")[0] < 0.95  # why the verified defaults exist
    _no_originals_merged(rep)


def test_fashion_mnist_no_false_merges_with_defaults():
    items = []
    for i, img in enumerate(fashion_mnist(5000, seed=1)):
        items.append((f"f{i:05d}", png(img)))
    pool = _pool(items)
    assert find_near_duplicates(pool, DedupConfig()).num_rows == 0
    # the guards matter: pHash alone at a radius that finds most resized copies merges products
    assert find_near_duplicates(pool, DedupConfig(phash_radius=4, dhash_radius=None, **HASH64)).num_rows > 50
    assert find_near_duplicates(pool, DedupConfig(phash_radius=8, dhash_radius=8, **HASH64)).num_rows > 0


def test_equal_runs_gives_every_pair_of_equal_keys_once():
    from lvd.curation.hamming_pairs import _equal_runs

    a, b = _equal_runs(np.array([5, 5, 5, 2, 5, 7, 2], np.uint64))
    got = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}
    assert got == {(0, 1), (0, 2), (0, 4), (1, 2), (1, 4), (2, 4), (3, 6)} and len(a) == 7


# ---- brightness / contrast channel: equalised codes, clipped codes, unclipped residual -----


def test_stable_equalise_by_hand_and_levels_below_a_clip_keep_their_values():
    x = np.array([[0, 0, 10, 20], [30, 30, 255, 255]], float)
    # counts 2,1,1,2,2 of 8; darkest -> upper rank 2, brightest -> lower rank 6, others mid-rank
    assert np.allclose(stable_equalise(x), np.array([[2, 2, 2.5, 3.5], [5, 5, 6, 6]]) / 8 * 255)
    # clipped at 25 (a brightening copy's white mass): the levels below keep their values
    assert np.allclose(stable_equalise(np.minimum(x, 25)), np.array([[2, 2, 2.5, 3.5], [4, 4, 4, 4]]) / 8 * 255)
    ringing = x.copy()
    ringing[1, 2] = 252  # within EQUALISE_MERGE of the brightest level: joins it
    assert np.allclose(stable_equalise(ringing), stable_equalise(x))


@functools.cache
def _fashion(split: str) -> np.ndarray:
    return load_fashion_mnist(split)[0]


def _product(i: int, side: int = 112) -> Image.Image:
    """Fashion-MNIST test image i as a white-background product shot (as copies' bench dump)."""
    img = Image.fromarray(_fashion("test")[i]).resize((side, side), Image.Resampling.BICUBIC)
    return Image.fromarray(255 - np.asarray(img))


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), np.float64)


def test_brightened_product_lands_on_its_originals_clipped_code():
    """Brightening by f clips the light garment into the white; the original's code clipped at
    max / f (cphash256) is where the copy's plain code lands, far closer than the plain codes."""
    near, plain = [], []
    for i in (0, 1, 2, 3, 5, 8):
        img = _product(i)
        for k, f in enumerate(CLIP_FACTORS):
            orig, copy = brightness_codes(_gray(img)), brightness_codes(_gray(ImageEnhance.Brightness(img).enhance(f)))
            near.append(np.unpackbits(orig[1 + k] ^ copy[0]).sum())
            plain.append(np.unpackbits(orig[0] ^ copy[0]).sum())
    assert max(near) <= 12 and np.median(plain) > 2 * np.median(near) + 10, (near, plain)


def _mask_reference(x: np.ndarray) -> np.ndarray:
    """Per cell of the 16x16 grid: any overlapping pixel >= 250 / <= 5 (a loop over cells)."""
    h, w = x.shape
    out = np.zeros((2, 16, 16), bool)
    for r in range(16):
        rows = [i for i in range(h) if i + 1 > r * h / 16 and i < (r + 1) * h / 16]
        for c in range(16):
            cols = [j for j in range(w) if j + 1 > c * w / 16 and j < (c + 1) * w / 16]
            cell = x[np.ix_(rows, cols)]
            out[0, r, c], out[1, r, c] = (cell >= 250).any(), (cell <= 5).any()
    return out.reshape(2, 256)


@pytest.mark.parametrize("shape", [(64, 64), (70, 53), (128, 96)])
def test_saturation_masks_match_a_loop_over_cells(shape):
    rng = np.random.default_rng(shape[1])
    x = rng.integers(6, 250, shape).astype(float)
    for value in (255, 250, 0, 5):
        x[tuple(rng.integers(0, s, 12) for s in shape)] = value
    x[tuple(rng.integers(0, s, 12) for s in shape)] = 249  # not saturated
    assert np.array_equal(saturation_masks(x), _mask_reference(x))


def _unclipped_reference(ta, tb, sa, sb, min_cells) -> float:
    """Trusted reference: lstsq (scale + offset) on each cell set, both ways; the smaller set value."""
    light = np.unpackbits(sa[:32]) | np.unpackbits(sb[:32])
    dark = np.unpackbits(sa[32:]) | np.unpackbits(sb[32:])
    best = np.inf
    for clipped in (light, light | dark):
        m = clipped == 0
        if m.sum() < min_cells:
            continue
        worst, slopes = 0.0, []
        for x, y in ((ta[m], tb[m]), (tb[m], ta[m])):
            design = np.stack([x.astype(float), np.ones(m.sum())], axis=1)
            coef, *_ = np.linalg.lstsq(design, y.astype(float), rcond=None)
            worst, slopes = max(worst, float(np.abs(design @ coef - y).max())), slopes + [coef[0]]
        if min(slopes) > 0:
            best = min(best, worst)
    return best


def test_unclipped_residual_matches_a_reference_and_fits_clipped_brightening_away():
    rng = np.random.default_rng(7)
    n = 40
    ta = rng.integers(20, 180, (n, THUMB_CELLS)).astype(np.uint8)
    tb = np.rint(1.3 * ta.astype(float) + 5).astype(np.uint8)  # brightness + contrast, <= 239
    light = np.zeros((n, THUMB_CELLS), bool)
    light[:, :100] = rng.random((n, 100)) < 0.6  # clipped cells: anything goes there
    tb[light] = 255 - rng.integers(0, 60, light.sum()).astype(np.uint8)
    dark = np.zeros((n, THUMB_CELLS), bool)
    dark[:, 200:] = True
    sa = np.concatenate([np.packbits(np.zeros_like(light), axis=1), np.packbits(dark, axis=1)], axis=1)
    sb = np.concatenate([np.packbits(light, axis=1), np.packbits(dark, axis=1)], axis=1)
    assert np.all(unclipped_residual(ta, tb, sa, sb) < 1.0)  # fits away wherever nothing clipped
    tb[:20, 150] = np.clip(tb[:20, 150].astype(int) + 40, 0, 255)  # a local difference (a strap)
    tb[20:30] = 255 - tb[20:30]  # an inverted image: decreasing fit
    sb[30:, :] = 255  # nothing unclipped left: no support
    sb[30:35, :32] = np.packbits(light[30:35], axis=1)  # light clipped only: dark cells remain
    got = unclipped_residual(ta, tb, sa, sb, min_cells=16)
    want = [_unclipped_reference(ta[i], tb[i], sa[i], sb[i], 16) for i in range(n)]
    assert np.allclose(got, want, atol=0.05), np.c_[got, want][np.abs(got - want) > 0.05]
    assert np.all(got[:20] > 20) and np.all(np.isinf(got[20:30])) and np.all(np.isinf(got[35:]))
    assert np.all(got[30:35] < 1.0)  # the light-only cell set keeps the dark cells' support


def test_equalised_candidates_equal_brute_force():
    rng = np.random.default_rng(3)
    n, k, radius = 300, 1 + len(CLIP_FACTORS), 12
    codes = rng.integers(0, 256, (n, k, 32), dtype=np.uint8)

    def near(code, bits):
        out = np.unpackbits(code)
        out[rng.choice(256, bits, replace=False)] ^= 1
        return np.packbits(out)

    for i in range(10):  # planted: plain~plain, plain~clipped (both ways), clipped~clipped only
        codes[100 + i, 0] = near(codes[i, 0], radius)
        codes[120 + i, 0] = near(codes[20 + i, 1 + i % 4], radius - 1)
        codes[140 + i, 2] = near(codes[40 + i, 0], radius)
        codes[160 + i, 3] = near(codes[60 + i, 2], 1)  # not a candidate: neither code is plain
        codes[180 + i, 0] = near(codes[80 + i, 0], radius + 1)  # one bit too far
    words = codes.view(np.uint64)
    a, b = equalised_candidates(words, radius)
    d = np.bitwise_count(words[:, None, :, None] ^ words[None, :, None, :]).sum(-1)  # [n, n, k, k]
    best = np.minimum(d[:, :, 0, :].min(-1), d[:, :, :, 0].min(-1))
    want = {(i, j) for i, j in zip(*np.nonzero(np.triu(best <= radius, 1)))}
    assert set(zip(a.tolist(), b.tolist())) == want and len(a) == len(want)
    assert {(i, 100 + i) for i in range(10)} | {(20 + i, 120 + i) for i in range(10)} <= want
    assert {(40 + i, 140 + i) for i in range(10)} <= want
    assert not {(60 + i, 160 + i) for i in range(10)} & want and not {(80 + i, 180 + i) for i in range(10)} & want


# Fashion-MNIST train products whose equalised codes are within 12-20 bits of another's (or of
# its clipped codes): sandals, sneakers, shirts (closest pairs among 20,000, h11b's notes).
LOOKALIKES = (22170, 37182, 31053, 48194, 42944, 49362, 7963, 52412, 24535, 36921, 40700, 18303, 41959)


@pytest.fixture(scope="module")
def brightened_pool() -> pa.Table:
    items = []
    for i in LOOKALIKES:
        img = Image.fromarray(_fashion("train")[i]).resize((64, 64), Image.Resampling.BICUBIC)
        for tag, im in (("look", img), ("lookinv", Image.fromarray(255 - np.asarray(img)))):
            items.append((f"{tag}{i}:orig", png(im)))
    rng = np.random.default_rng(0)
    for i in rng.choice(10000, 60, replace=False).tolist():
        img = _product(i)
        for kind, im in (("orig", img), ("brightened", ImageEnhance.Brightness(img).enhance(rng.uniform(1.2, 1.45)))):
            items.append((f"prod{i}:{kind}", png(im)))
    return _pool(items)


def test_brightened_products_found_and_lookalike_products_kept_apart(brightened_pool):
    """White-background products brightened x1.2-1.45 (light garments fade into the white):
    measured 60 of 60 found; 53 without the clipped-code rule (the 7 keep < 16 unclipped
    cells to fit), 9 without the channel; the look-alike products (black- and white-background)
    stay apart, and would merge if the channel linked its candidates unchecked, or took
    clipped codes within 24 bits as sure (16 merge)."""

    def found(cfg):
        rep = _groups(brightened_pool, find_near_duplicates(brightened_pool, cfg))
        return _recall(rep, "brightened")[0], rep

    recall, rep = found(DedupConfig())
    assert recall == 1.0, recall
    _no_originals_merged(rep)
    assert found(DedupConfig(clipped_code_sure_radius=None))[0] < 0.9
    assert found(DedupConfig(equalised_radius=None))[0] < 0.3
    wide = found(DedupConfig(clipped_code_sure_radius=24))[1]
    assert len({wide[u] for u in wide if u.endswith(":orig")}) < sum(u.endswith(":orig") for u in wide)
    unchecked = found(DedupConfig(equalised_sure_radius=24))[1]
    originals = [u for u in unchecked if u.endswith(":orig")]
    assert len({unchecked[u] for u in originals}) < len(originals)  # look-alikes merge without the check
    # the soft channel's limit (7 gray levels): these look-alikes fit within 18 (2 merge there)
    loose = found(DedupConfig(soft_max_residual=18.0))[1]
    assert len({loose[u] for u in originals}) < len(originals)


def test_gamma_copies_fit_a_power_curve_and_lookalikes_do_not():
    """Held-out products (Fashion-MNIST test, 112 px) with a gamma curve (0.55-0.75 or
    1.35-1.7) and JPEG q90, beside the look-alike products: the affine checks miss 3 of 60
    (measured), the power-curve fit finds all, and no two distinct products merge."""
    rng = np.random.default_rng(7)
    items = []
    for i, img in enumerate(fashion_mnist(60, size=112, seed=9, split="test")):
        g = float(rng.choice([rng.uniform(0.55, 0.75), rng.uniform(1.35, 1.7)]))
        lut = [round(255 * (v / 255) ** g) for v in range(256)]
        items += [(f"prod{i}:orig", png(img)), (f"prod{i}:gamma", jpeg(img.convert("RGB").point(lut * 3), 90))]
    for i in LOOKALIKES:
        # 64 px as in brightened_pool (at 112 px, 48194 and 31053, two flip-flops 5 gray levels
        # apart on average, already merge without the curve)
        img = Image.fromarray(_fashion("train")[i]).resize((64, 64), Image.Resampling.BICUBIC)
        items += [(f"look{i}:orig", png(img)), (f"lookinv{i}:orig", png(Image.fromarray(255 - np.asarray(img))))]
    pool = _pool(items)
    rep = _groups(pool, find_near_duplicates(pool, DedupConfig()))
    assert _recall(rep, "gamma") == (1.0, [])
    _no_originals_merged(rep)
    affine = _groups(pool, find_near_duplicates(pool, DedupConfig(fit_gammas=())))
    assert len(_recall(affine, "gamma")[1]) >= 2


def test_gamma_copies_of_soft_patches_and_faces_kept_apart():
    """LFW non-face patches (soft, 150 px) with a gamma curve and JPEG q90, beside the 100 LFW
    faces: measured 53 of 60 found (45 with affine fits only; the power curve helps in the soft
    channel too, whose candidates are the 64-bit pHash's), and no two distinct images merge."""
    rng = np.random.default_rng(11)
    items = [(f"face{i}:orig", png(lfw(i, rgb=False))) for i in range(100)]
    for i in range(100, 160):
        img = lfw(i, 150, rgb=False)
        g = float(rng.choice([rng.uniform(0.55, 0.75), rng.uniform(1.35, 1.7)]))
        lut = [round(255 * (v / 255) ** g) for v in range(256)]
        items += [(f"patch{i}:orig", png(img)), (f"patch{i}:gamma", jpeg(img.convert("RGB").point(lut * 3), 90))]
    pool = _pool(items)
    rep = _groups(pool, find_near_duplicates(pool, DedupConfig()))
    assert _recall(rep, "gamma")[0] >= 0.85, _recall(rep, "gamma")
    _no_originals_merged(rep)
    affine = _groups(pool, find_near_duplicates(pool, DedupConfig(fit_gammas=())))
    assert _recall(affine, "gamma")[0] <= 0.8


def test_ingest_writes_the_brightness_columns():
    """nphash256 / cphash256 / sat16 are brightness_codes and saturation_masks of ingest's gray
    (a 64 px grayscale PNG is hashed as it is)."""
    img = _product(4, side=64)
    rec, _ = ingest_item(RawItem("p", png(img), None), IngestConfig())
    codes, x = brightness_codes(_gray(img)), _gray(img)
    assert rec["nphash256"] == codes[0].tobytes() and rec["cphash256"] == codes[1:].tobytes()
    assert rec["sat16"] == np.packbits(saturation_masks(x)).tobytes()
    assert saturation_masks(x)[0].sum() > 100  # the white background is light-saturated


def test_brightened_products_between_the_clip_levels_land_near_a_clipped_code():
    """Products brightened x1.18-1.32 (between the older grid's x1.15 and x1.3 codes) through
    the real ingest: the copy's plain equalised code lies within the channel's radius of one of
    its original's codes. Measured (100 products): max 18 bits, p90 8; with the older 4-code
    grid 2 copies were beyond 24 bits (max 32), p90 12."""
    rng = np.random.default_rng(5)
    dist = []
    for img in fashion_mnist(100, size=112, seed=5, split="test"):
        copy = jpeg(ImageEnhance.Brightness(img).enhance(rng.uniform(1.18, 1.32)), 90)
        (orig, _), (cp, _) = (ingest_item(RawItem("x", d, None), IngestConfig()) for d in (png(img), copy))
        codes = np.frombuffer(orig["nphash256"] + orig["cphash256"], np.uint8).reshape(-1, 32)
        dist.append(np.unpackbits(codes ^ np.frombuffer(cp["nphash256"], np.uint8), axis=1).sum(axis=1).min())
    assert len(codes) == 1 + len(CLIP_FACTORS)
    assert max(dist) <= DedupConfig().equalised_radius and np.percentile(dist, 90) <= 10, sorted(dist)[-5:]


@pytest.fixture(scope="module")
def soft_pool() -> pa.Table:
    """LFW non-face patches (soft, low contrast) at 120 px with a JPEG q15-25 copy each, and
    the 100 LFW faces as distinct look-alikes."""
    rng = np.random.default_rng(3)
    items = [(f"face{i}:orig", png(lfw(i, rgb=False))) for i in range(100)]
    for i in range(100, 160):
        items += [
            (f"patch{i}:orig", png(lfw(i, rgb=False))),
            (f"patch{i}:jpeg", jpeg(lfw(i, rgb=False), int(rng.integers(15, 26)))),
        ]
    return _pool(items)


def test_soft_channel_finds_jpeg_copies_of_soft_images_and_keeps_faces_apart(soft_pool):
    """JPEG q15-25 flips pHash-256 / dHash bits of soft patches (no high frequencies to hash)
    while their 64-bit pHash and thumbnails hold: the soft channel finds them. Measured: 47/60
    with it, 21/60 without, 30/60 at soft_phash_radius 2; no original merged. Without the
    flatness guard (min_thumb_spread 0) 3 near-blank patches merge with each other."""

    def found(cfg):
        rep = _groups(soft_pool, find_near_duplicates(soft_pool, cfg))
        return _recall(rep, "jpeg")[0], rep

    recall, rep = found(DedupConfig())
    assert recall >= 0.75, recall
    _no_originals_merged(rep)
    assert found(DedupConfig(soft_max_residual=None))[0] <= 0.5
    assert found(DedupConfig(soft_phash_radius=2))[0] <= 0.6  # the pHash moves 4-8 bits
    unguarded = found(DedupConfig(min_thumb_spread=0.0))[1]
    originals = [u for u in unguarded if u.endswith(":orig")]
    assert len({unguarded[u] for u in originals}) < len(originals)


def test_near_blank_patches_are_not_linked_by_their_equalised_codes():
    """Two blank LFW patches (a light grey one, levels 233-236, and a black one, 0-3) equalise
    to the same flat image, so their equalised codes were equal (a sure pair, linked unchecked);
    thumbnails flatter than min_thumb_spread keep out of the equalised and soft channels."""
    pool = _pool([("light:orig", png(lfw(163, rgb=False))), ("black:orig", png(lfw(174, rgb=False)))])
    assert pool["nphash256"][0] == pool["nphash256"][1]  # the trap
    assert find_near_duplicates(pool, DedupConfig()).num_rows == 0
    assert find_near_duplicates(pool, DedupConfig(min_thumb_spread=0.0)).num_rows == 1


def test_increasing_thumb_residual_refuses_an_inverted_thumbnail():
    """The soft channel's fit: brightness / contrast fit away (as thumb_residual), but the
    negative image, which thumb_residual fits exactly, is refused (inf)."""
    t = np.asarray(lfw(5, side=16, rgb=False).convert("L"), np.uint8).reshape(1, THUMB_CELLS)
    brighter = np.clip(t.astype(np.float64) * 0.8 + 30, 0, 255).astype(np.uint8)
    assert increasing_thumb_residual(t, brighter)[0] <= 1.0
    assert thumb_residual(t, 255 - t)[0] <= 1e-3 and increasing_thumb_residual(t, 255 - t)[0] == np.inf


def test_every_linked_pair_is_within_a_candidate_code(soft_pool):
    """`candidate_codes` names every search (the partitioned dedup buckets by it): each edge
    the single process links, soft channel's included, is within one entry's radius."""
    from lvd.curation.dedup import candidate_codes, table_edges

    cfg = DedupConfig()
    edges = table_edges(soft_pool, cfg)
    covered = np.zeros(len(edges), bool)
    for code in candidate_codes(cfg):
        col = soft_pool[code.column]
        if pa.types.is_integer(col.type):
            bits = np.bitwise_count(col.to_numpy()[edges.a] ^ col.to_numpy()[edges.b])
        else:
            x = np.frombuffer(b"".join(col.to_pylist()), np.uint8).reshape(len(soft_pool), -1)
            v = x if code.variants is None else np.frombuffer(b"".join(soft_pool[code.variants].to_pylist()), np.uint8)
            v = v.reshape(len(soft_pool), -1, x.shape[1])
            bits = np.minimum(
                np.unpackbits(x[edges.a, None] ^ v[edges.b], axis=2).sum(axis=2).min(axis=1),
                np.unpackbits(x[edges.b, None] ^ v[edges.a], axis=2).sum(axis=2).min(axis=1),
            )
            if code.variants is not None:  # the plain codes against each other too
                bits = np.minimum(bits, np.unpackbits(x[edges.a] ^ x[edges.b], axis=1).sum(axis=1))
        covered |= bits <= code.radius
    assert len(edges) > 60 and covered.all(), int((~covered).sum())
    assert "soft" in {c.channel for c in candidate_codes(cfg)}


def test_brightness_codes_are_phashes_of_the_equalised_and_clipped_images():
    """The batched hashing in brightness_codes equals pHash-256 of each image one at a time: of
    stable_equalise(x), then of x clipped at max / f, equalised (non-square, as ingest sees)."""
    from lvd.curation.phash import phash_bits

    x = _gray(lfw(7, side=70, rgb=False).crop((0, 0, 70, 53)))
    codes = brightness_codes(x)
    clipped = [np.minimum(x, np.rint(x.max() / f)) for f in CLIP_FACTORS]
    expect = [phash_bits(stable_equalise(y), 16) for y in [x, *clipped]]
    assert np.array_equal(codes, np.packbits(np.array(expect), axis=1))
