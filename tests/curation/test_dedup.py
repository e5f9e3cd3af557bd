"""Near-duplicate edges against brute force, resolve semantics, and real-image quality."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lvd.curation.copies import COPY_KINDS, encode_original, fashion_mnist, make_copies, real_photos
from lvd.curation.dedup import DedupConfig, EdgeSet, find_near_duplicates, near_duplicate_edges, resolve
from lvd.curation.ingest import IngestConfig, ingest_item
from lvd.curation.sources import RawItem

NOASPECT = dict(max_aspect_ratio=None)


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
    n, cfg = 1500, DedupConfig(phash_radius=8, dhash_radius=8, verify_radius=16, **NOASPECT)
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
    t = find_near_duplicates(_table([f"u{i:03d}" for i in range(500)], p, d, w=[10] * 500, h=[10] * 500), DedupConfig())
    assert t.num_rows == 499 and set(t["duplicate_of"].to_pylist()) == {"u000"}


def test_aspect_ratio_guard():
    p = np.array([1, 1, 1], np.uint64)
    d = np.array([2, 2, 2], np.uint64)
    aspect = np.array([1.0, 1.05, 2.0])
    es = near_duplicate_edges(p, d, DedupConfig(max_aspect_ratio=1.1), aspect=aspect)
    assert set(zip(es.a.tolist(), es.b.tolist())) == {(0, 1)}
    strict = near_duplicate_edges(p, d, DedupConfig(max_aspect_ratio=1.0), aspect=np.array([1.0, 1.05, 1.0]))
    assert set(zip(strict.a.tolist(), strict.b.tolist())) == {(0, 2)}
    with pytest.raises(ValueError, match="aspect"):
        near_duplicate_edges(p, d, DedupConfig())


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
    base = find_near_duplicates(t, DedupConfig())
    assert base.num_rows >= 30
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        assert find_near_duplicates(t.take(perm), DedupConfig()).equals(base)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="phash_radius=40"):
        DedupConfig(phash_radius=40)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        DedupConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="phash256"):
        find_near_duplicates(_table(["a"], [1], [1], w=[1], h=[1]), DedupConfig(verify_radius=8))


# ---- real images through the real ingest -------------------------------------------------


def _phash256(data: bytes) -> bytes:
    bits = imagehash.phash(Image.open(io.BytesIO(data)).convert("L"), hash_size=16).hash.ravel()
    return np.packbits(bits).tobytes()


def _pool(items: list[tuple[str, bytes]]) -> pa.Table:
    rows = []
    for uid, data in items:
        rec, _ = ingest_item(RawItem(uid, data, None), IngestConfig())
        assert rec["status"] == "accepted", (uid, rec["reason"])
        rows.append(dict(uid=uid, w=rec["width"], h=rec["height"], p=rec["phash"], d=rec["dhash"], v=_phash256(data)))
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return _table(col("uid"), col("p"), col("d"), w=col("w"), h=col("h"), phash256=pa.array(col("v"), pa.binary(32)))


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


@pytest.mark.parametrize(
    "cfg,kinds",
    [
        (DedupConfig(), ["exact"]),
        (DedupConfig(phash_radius=8, dhash_radius=8, verify_radius=16), [k for k in COPY_KINDS if k != "cropped"]),
        (DedupConfig(phash_radius=14, dhash_radius=12), list(COPY_KINDS)),
    ],
    ids=["default", "verified", "wide"],
)
def test_real_copies_grouped_and_distinct_photos_kept(photo_pool, cfg, kinds):
    rep = _groups(photo_pool, find_near_duplicates(photo_pool, cfg))
    for uid in rep:
        name, kind = uid.split(":")
        if kind in kinds:
            assert rep[uid] == rep[f"{name}:orig"], uid
    originals = [u for u in rep if u.endswith(":orig")]
    assert len({rep[u] for u in originals}) == len(originals)  # no two distinct photos merged


def test_fashion_mnist_no_false_merges_with_defaults():
    items = []
    for i, img in enumerate(fashion_mnist(3000, seed=1)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        items.append((f"f{i:05d}", buf.getvalue()))
    pool = _pool(items)
    assert find_near_duplicates(pool, DedupConfig()).num_rows == 0
    # the guard matters: pHash alone at a radius that finds most resized copies merges products
    assert find_near_duplicates(pool, DedupConfig(phash_radius=4, dhash_radius=None)).num_rows > 50
    assert find_near_duplicates(pool, DedupConfig(phash_radius=8, dhash_radius=8, verify_radius=16)).num_rows == 0
