"""The partitioned hash dedup (lvd.curation.scale.hashdedup) and connected components
(scale.components) give exactly the single-process result: real copies through a run folder,
a synthetic pool with a pair for each channel at its hardest, a 1,000-node path, random graphs
against dedup.resolve, and (slow) a 3-node `ray.cluster_utils.Cluster` in a subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvd.curation import rundir
from lvd.curation.copies import make_copies, real_photos
from lvd.curation.dedup import CLIPPED_CODES, DedupConfig, EdgeSet, candidate_codes, find_near_duplicates, resolve
from lvd.curation.scale.components import ComponentsConfig, components, rounds_bound
from lvd.curation.scale.hashdedup import (
    Code,
    ShuffleConfig,
    SortedIndex,
    _CodeIndex,
    _plan,
    exact_pass,
    folder_sources,
    pair_pass,
    partitioned_duplicates,
    slice_bounds,
    slice_of,
)
from lvd.curation.stages import ingest_dedup as stages

SMALL = ShuffleConfig(buckets=3, exact_buckets=2, partitions=2)


def _codes(rng, n: int, nbytes: int) -> np.ndarray:
    return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)


def _flip(code: np.ndarray, bits: list[int]) -> np.ndarray:
    out = code.copy()
    for b in bits:
        out[b // 8] ^= np.uint8(1 << (b % 8))
    return out


def synthetic_pool(n: int = 300, seed: int = 0) -> tuple[pa.Table, dict[str, tuple[int, int]]]:
    """Random hash records plus one planted case per channel; returns the table and the
    planted (row, row) pairs by name."""
    rng = np.random.default_rng(seed)
    p, d = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    v, e, ce = _codes(rng, n, 32), _codes(rng, n, 32), _codes(rng, n, 32 * CLIPPED_CODES)
    t = rng.integers(20, 200, (n, 256), dtype=np.uint8)
    w, h = rng.choice([64, 96], n).astype(np.int32), np.full(n, 64, np.int32)
    cases = {}

    def like(dst, src, *, bits_v=(), bits_e=None, thumb=True, bits_p=2):
        p[dst] = p[src] ^ np.uint64(sum(1 << (7 * k) for k in range(bits_p)))  # bits_p bits apart
        d[dst] = d[src] ^ np.uint64(0b11)
        v[dst] = _flip(v[src], list(bits_v))
        if bits_e is not None:  # else nphash256 stays random: only the channel under test links them
            e[dst] = _flip(e[src], bits_e)
        t[dst] = np.clip(t[src].astype(int) + rng.integers(-2, 3, 256), 0, 255) if thumb else t[dst]
        w[dst], h[dst] = w[src], h[src]

    like(1, 0, bits_v=range(0, 120, 10))  # main channel: 12 bits of pHash-256
    like(2, 1, bits_v=range(3, 40, 10))  # ... and a third member through the second
    cases["main"] = (0, 1)
    for k in (4, 5, 6):  # identical records: the exact pass
        p[k], d[k], v[k], e[k], ce[k], t[k], w[k], h[k] = p[3], d[3], v[3], e[3], ce[3], t[3], w[3], h[3]
    cases["exact"] = (3, 4)
    like(8, 7, bits_v=[b * 8 for b in range(24)])  # pHash-256 at 24 bits: only the clipped channel
    cases["clipped"] = (7, 8)
    # nphash256 at exactly its radius R, one bit in each chunk of a split into R: no common
    # chunk there, so only the split into R + 1 (pigeonhole) finds it; other columns random
    r = DedupConfig().equalised_radius
    e[10] = _flip(e[9], [k * 256 // r for k in range(r)])
    bounds = [k * 256 // (r + 1) for k in range(r + 2)]
    w[10], h[10], t[10] = w[9], h[9], np.clip(t[9].astype(int) + rng.integers(-2, 3, 256), 0, 255)
    cases["equalised"] = (9, 10)
    # one of row 13's clipped codes (the third) within R bits of row 14's equalised code,
    # agreeing on the first of R + 1 chunks only
    e[14] = _flip(ce[13, 64:96], bounds[1 : r + 1])
    w[14], h[14], t[14] = w[13], h[13], t[13]
    cases["clipped code"] = (13, 14)
    like(12, 11, bits_v=range(0, 80, 10), thumb=False)  # close hashes, another thumbnail: no edge
    cases["decoy"] = (11, 12)
    # at the pHash radius (8 bits), which 'main' and 'clipped' are searched by with 'soft'
    like(16, 15, bits_v=range(0, 120, 10), bits_p=DedupConfig().phash_radius)
    cases["main at the pHash radius"] = (15, 16)
    like(18, 17, bits_v=[b * 8 for b in range(24)], bits_p=DedupConfig().phash_radius)
    cases["clipped at the pHash radius"] = (17, 18)
    table = pa.table(
        {
            "uid": [f"{x:064x}" for x in rng.integers(0, 2**62, n)],
            "width": w, "height": h,
            "phash": pa.array(p, pa.uint64()), "dhash": pa.array(d, pa.uint64()),
            "phash256": pa.array([r.tobytes() for r in v], pa.binary(32)),
            "thumb16": pa.array([r.tobytes() for r in t], pa.binary(256)),
            "nphash256": pa.array([r.tobytes() for r in e], pa.binary(32)),
            "cphash256": pa.array([r.tobytes() for r in ce], pa.binary(32 * CLIPPED_CODES)),
            "sat16": pa.array([bytes(64)] * n, pa.binary(64)),  # no saturated cells
        }
    )  # fmt: skip
    return table, cases


def write_parts(table: pa.Table, folder, parts: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i}.parquet")


def _linked(dups: pa.Table, table: pa.Table, a: int, b: int) -> bool:
    rep = dict(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    ua, ub = table["uid"][a].as_py(), table["uid"][b].as_py()
    return rep.get(ua, ua) == rep.get(ub, ub)


def test_synthetic_pool_equals_single_process_with_every_channel(ray_local, tmp_path):
    table, cases = synthetic_pool()
    want = find_near_duplicates(table, DedupConfig())
    for name in (
        "main",
        "exact",
        "clipped",
        "equalised",
        "clipped code",
        "main at the pHash radius",
        "clipped at the pHash radius",
    ):
        assert _linked(want, table, *cases[name]), name  # each planted case is a real duplicate
    assert not _linked(want, table, *cases["decoy"])
    write_parts(table, tmp_path / "parts")
    rep = partitioned_duplicates(folder_sources(tmp_path / "parts"), DedupConfig(), tmp_path / "work", SMALL)
    got = pq.read_table(rep.duplicates)
    assert got.equals(want), (got.to_pydict(), want.to_pydict())
    edges = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "work" / "edges").glob("*.parquet"))])
    # 'main' and 'clipped' are searched on the 64-bit pHash with 'soft' (dedup.candidate_codes)
    assert set(edges["channel"].to_pylist()) == {"exact", "main+clipped+soft", "equalised"}
    seen: dict = {}  # a pair of pHash codes is answered in one block task: that of its later block
    for f in sorted((tmp_path / "work" / "edges").glob("b*.parquet")):
        t = pq.read_table(f).filter(pc.equal(pq.read_table(f)["channel"], "main+clipped+soft"))
        for pair in set(zip(t["uid_a"].to_pylist(), t["uid_b"].to_pylist())):
            assert seen.setdefault(pair, f.name) == f.name, pair
    assert len(seen) == 6  # 0-1, 1-2, 0-2 (0 and 2 are within radius too), 7-8, 15-16, 17-18
    assert (
        rep.records == table.num_rows and rep.blocks == 3
    )  # slices of the whole pool: ShuffleConfig.buckets, whatever the exact buckets
    assert rep.candidates == _brute_candidates(table.filter(pa.array(~np.isin(np.arange(table.num_rows), [4, 5, 6]))))


def test_pair_pass_runs_the_tasks_asked_for_and_their_edges_are_the_whole_runs(ray_local, tmp_path):
    """The scale benchmark runs the exact pass, then a sample of the block tasks
    (`exact_pass`, `pair_pass(tasks=...)`): each task asked for writes its block's edges, those
    of the whole run, and no other task runs."""
    table, _ = synthetic_pool()
    write_parts(table, tmp_path / "parts")
    rep = partitioned_duplicates(folder_sources(tmp_path / "parts"), DedupConfig(), tmp_path / "whole", SMALL)
    plan = exact_pass(folder_sources(tmp_path / "parts"), DedupConfig(), tmp_path / "work", SMALL)
    assert (plan.records, len(plan.blocks), plan.block_pairs) == (rep.records, rep.blocks, rep.block_pairs)
    busy = max(range(len(plan.blocks)), key=lambda j: len(plan.others[j]))
    done = pair_pass(plan, DedupConfig(), tmp_path / "work", SMALL, [busy])
    assert len(done) == 1 and done[0][2] > 0
    assert [f.name for f in (tmp_path / "work" / "edges").glob("b*.parquet")] == [f"b{busy:05d}.parquet"]
    mine = pq.read_table(tmp_path / "work" / "edges" / f"b{busy:05d}.parquet")
    assert mine.num_rows == done[0][1] > 0
    assert mine.equals(pq.read_table(tmp_path / "whole" / "edges" / f"b{busy:05d}.parquet"))


def test_main_and_clipped_keep_their_own_search_when_soft_searches_the_phash_less_far(ray_local, tmp_path):
    """`dedup.candidate_codes` moves 'main' and 'clipped' to the 64-bit pHash only when 'soft'
    searches it at least `phash_radius` far: with soft at 4 bits, the pairs at pHash 8 are
    still found (on the 256-bit pHash), and the partitioned table equals the single process."""
    cfg = DedupConfig(soft_phash_radius=4)
    assert {(c.channel, c.column) for c in candidate_codes(cfg)} >= {("main", "phash256"), ("clipped", "phash256")}
    table, cases = synthetic_pool(seed=1)
    want = find_near_duplicates(table, cfg)
    for name in ("main at the pHash radius", "clipped at the pHash radius"):
        assert _linked(want, table, *cases[name]), name
    write_parts(table, tmp_path / "parts")
    rep = partitioned_duplicates(folder_sources(tmp_path / "parts"), cfg, tmp_path / "work", SMALL)
    assert pq.read_table(rep.duplicates).equals(want)


def test_blocks_sliced_by_aspect_skip_only_pairs_no_channel_links(ray_local, tmp_path):
    """Blocks hold slices of the pool's aspects (its (log aspect, id) order cut at sampled
    quantiles, `hashdedup.slice_bounds`), and
    a block pair whose aspects lie further apart than `max_aspect_ratio` is not searched. Two
    aspect clusters split exactly at the middle block cut, the gap between them exactly the
    tolerance, and copies across it (the main pair at aspect ratio 1.1, the limit: the single
    process links them): the table still equals the single process's (a reach a hair short
    misses them), and the blocks from opposite ends were not searched against each other."""
    table, cases = synthetic_pool(400, seed=2)
    rng = np.random.default_rng(2)
    w = np.zeros(table.num_rows, np.int32)
    # planted rows: 0 and 2 at the top of the low cluster, 1 at the bottom of the high one (0-1,
    # 1-2: ratio 1.1 across the gap); the other planted pairs inside a cluster
    w[[0, 2]], w[1] = 100, 110
    w[3:7], w[[7, 8]], w[[15, 16]] = 80, 85, 88
    w[[9, 10]], w[[11, 12]], w[[13, 14]], w[[17, 18]] = 120, 125, 130, 135
    # the slices' bounds: quantiles of every record's (aspect, id) key, copies included (the map
    # tasks' sample is complete on a pool this small): keys 100, 200, 300 of 400. 200 low ones
    # (10 planted, 3 of them 3's exact copies, and 190 more) fill blocks 0-1, the high ones 2-3
    rest = np.arange(19, table.num_rows)
    w[rest] = np.where(np.arange(len(rest)) < 190, rng.integers(78, 100, len(rest)), rng.integers(111, 144, len(rest)))
    table = table.set_column(table.schema.get_field_index("width"), "width", pa.array(w))
    table = table.set_column(table.schema.get_field_index("height"), "height", pa.array(np.full(len(w), 64, np.int32)))
    cfg = DedupConfig()
    want = find_near_duplicates(table, cfg)
    assert _linked(want, table, *cases["main"])  # the single process links the pair at the limit
    write_parts(table, tmp_path / "parts")
    shuffle = ShuffleConfig(buckets=4, exact_buckets=2, partitions=2)  # 4 aspect quartiles of 2 buckets
    rep = partitioned_duplicates(folder_sources(tmp_path / "parts"), cfg, tmp_path / "work", shuffle)
    assert pq.read_table(rep.duplicates).equals(want)
    # blocks 0-1 low, 2-3 high: 0-2, 0-3 (and 1-3) lie beyond reach; 1-2 meet at the limit
    assert rep.blocks == 4 and rep.block_pairs == 10 - 3, rep.block_pairs


def test_slices_cut_the_pool_evenly_by_weighted_samples_ties_by_id():
    """Blocks are slices of the pool's (log aspect, id) order: bounds from the map tasks'
    samples, weighted by the records each sampled key stands for; a pool of one aspect (every
    image square) is still cut into equal slices, by id; a key equal to a bound opens its slice."""
    rng = np.random.default_rng(0)
    # part 0: 100,000 records, 10,000 sampled (weight 10: SAMPLE_PER_BLOCK a slice, as exact_pass
    # samples); part 1: 1,000 records, all sampled
    a0, r0 = rng.normal(0.0, 0.1, 100_000), np.arange(100_000)
    pick = rng.permutation(100_000)[:10_000]
    a1, r1 = rng.normal(0.3, 0.05, 1000), (1 << 32) + np.arange(1000)
    bounds = slice_bounds([(a0[pick], r0[pick], 10.0), (a1, r1, 1.0)], 10)
    sizes = np.bincount(slice_of(np.r_[a0, a1], np.r_[r0, r1], bounds), minlength=10)
    assert len(sizes) == 10 and sizes.min() > 0.9 * 10_100 and sizes.max() < 1.1 * 10_100, sizes
    # unweighted, part 1's 1,000 records would take half the mass: its slices would be tiny
    same = slice_bounds([(np.zeros(1000), np.arange(1000), 1.0)], 4)
    assert same[1].tolist() == [250, 500, 750]
    assert np.bincount(slice_of(np.zeros(1000), np.arange(1000), same)).tolist() == [250] * 4
    assert slice_of(np.zeros(3), np.array([249, 250, 251]), same).tolist() == [0, 1, 1]


def _plant(rng, code: np.ndarray, index, k0: int, over: int, outside: bool) -> np.ndarray:
    """`code` with bits flipped so that every chunk but k0 differs in flips + 1 bits (over its
    radius) and k0 in flips + over bits; `outside`: one of k0's bits moved to bits no chunk
    holds. At over=0 the distance is exactly the radius for a plan with sum(flips + 1) = R + 1,
    and any bits the plan leaves to reach R go to k0 (a plan that covers less misses the pair)."""
    bounds, flips = index.bounds, index.flips
    take = [f + 1 for f in flips]
    take[k0] = flips[k0] + over + max(0, index.radius - (sum(take) - 1))
    bits = []
    for k, t in enumerate(take):
        bits += list(rng.choice(np.arange(bounds[k], bounds[k + 1]), t, replace=False))
    if outside and take[k0]:
        bits.remove(next(b for b in bits if bounds[k0] <= b < bounds[k0 + 1]))
        bits.append(int(rng.integers(bounds[-1], 64 * code.shape[0])))
    out = code.copy()
    for b in bits:
        out[b // 64] ^= np.uint64(1) << np.uint64(b % 64)
    return out


def _words(table: pa.Table, column: str, per_row: int = 1) -> np.ndarray:
    """uint64 [n, per_row, w] codes of a fixed-width binary or a uint64 column."""
    if pa.types.is_integer(table[column].type):
        return table[column].to_numpy().astype(np.uint64).reshape(-1, 1, 1)
    raw = np.frombuffer(b"".join(table[column].to_pylist()), np.uint8).copy()
    return raw.view(np.uint64).reshape(table.num_rows, per_row, -1)


def _brute_candidates(table: pa.Table) -> int:
    """Record pairs within the radius of a search `dedup.candidate_codes` names, one record's
    `column` code against any code of the other's (all pairs compared)."""
    near = np.zeros((table.num_rows, table.num_rows), bool)
    for c in candidate_codes(DedupConfig()):
        plain = _words(table, c.column)[:, 0]
        versions = [plain[:, None]] + ([_words(table, c.variants, CLIPPED_CODES)] if c.variants else [])
        versions = np.concatenate(versions, axis=1)
        hit = (np.bitwise_count(plain[:, None, None] ^ versions[None]).sum(-1) <= c.radius).any(-1)
        near |= hit | hit.T
    return int(np.triu(near, 1).sum())


def _code_table(rng, n: int) -> pa.Table:
    e, ce = _codes(rng, n, 32), _codes(rng, n, 32 * CLIPPED_CODES)
    return pa.table({"nphash256": pa.array(list(map(bytes, e)), pa.binary(32)),
                     "cphash256": pa.array(list(map(bytes, ce)), pa.binary(32 * CLIPPED_CODES))})  # fmt: skip


def test_block_pairs_search_variants_both_ways():
    """Between two blocks, a record's equalised code near a clipped code of the other block's
    record is found whichever block holds the clipped code (and a block against itself);
    two clipped codes alike make no pair. Brute force over all code versions."""
    rng, r = np.random.default_rng(6), DedupConfig().equalised_radius
    mine, other = _code_table(rng, 60), _code_table(rng, 70)
    mv, ov = _words(mine, "nphash256")[:, 0], _words(other, "nphash256")[:, 0]
    mc, oc = _words(mine, "cphash256", CLIPPED_CODES), _words(other, "cphash256", CLIPPED_CODES)
    flip = lambda c: _flip(c.view(np.uint8), list(rng.choice(256, r, replace=False))).view(np.uint64)  # noqa: E731
    mc[7, 2], oc[3, 1] = flip(ov[5]), flip(mv[11])  # a clipped code on either side
    mc[20, 0], oc[30, 3] = flip(np.zeros(4, np.uint64)), flip(np.zeros(4, np.uint64))  # clipped vs clipped
    mine = mine.set_column(
        1, "cphash256", pa.array([x.tobytes() for x in mc.reshape(60, -1)], pa.binary(32 * CLIPPED_CODES))
    )
    other = other.set_column(
        1, "cphash256", pa.array([x.tobytes() for x in oc.reshape(70, -1)], pa.binary(32 * CLIPPED_CODES))
    )
    code = Code("nphash256", r, "equalised", "cphash256")
    index = _CodeIndex(mine, code)
    for block, same in ((other, False), (mine, True)):
        a_v, a_c = _words(block, "nphash256")[:, 0], _words(block, "cphash256", CLIPPED_CODES)
        a_all = np.concatenate([a_v[:, None], a_c], axis=1)
        m_all = np.concatenate([mv[:, None], mc], axis=1)
        near = (np.bitwise_count(a_v[:, None, None] ^ m_all[None]).sum(-1) <= r).any(-1)
        near |= (np.bitwise_count(a_all[:, :, None] ^ mv[None, None]).sum(-1) <= r).any(1)
        if same:
            np.fill_diagonal(near, False)
        q, x = index.pairs(block, same=same)
        assert set(zip(q.tolist(), x.tolist())) == set(zip(*np.nonzero(near)))
    assert {(5, 7), (3, 11)} <= set(zip(*index.pairs(other, same=False)))
    assert (30, 20) not in set(zip(*index.pairs(other, same=False)))


def test_sorted_index_finds_exactly_the_pairs_within_radius():
    """Planted pairs at the radius that only one chunk can find (every other chunk one bit
    over its flips, that chunk at its flips; or one bit outside every chunk), the same one
    bit over the radius, random codes elsewhere: the index's pairs are the brute-force pairs.
    Plans: `_plan`'s (sum of flips + 1 = radius + 1) and given ones with uneven widths, 2-3
    flips and bits no chunk holds."""
    rng = np.random.default_rng(4)
    cases = [
        (45, 4, 2000, None), (28, 4, 3000, None), (24, 4, 3000, None), (8, 1, 800, None), (8, 1, 5000, None),
        (8, 1, 600, ((22, 2), (21, 2), (21, 2))),
        (28, 4, 800, ((22, 3), (20, 2), (17, 2), (15, 1), (13, 1), (12, 1), (11, 1)) + ((10, 0),) * 11),
        (16, 4, 800, ((21, 3), (19, 3), (12, 2), (9, 1), (9, 1), (8, 0), (7, 0))),
    ]  # fmt: skip
    for radius, w, nx, plan in cases:
        codes = rng.integers(0, 2**63, (nx, w), dtype=np.uint64) << np.uint64(1) | rng.integers(
            0, 2, (nx, w), dtype=np.uint64
        )
        index = SortedIndex(codes, radius, plan)
        chunks = len(index.flips)
        assert sum(f + 1 for f in index.flips) == radius + 1, index.flips  # tight: the cheapest plan is
        queries = rng.integers(0, 2**63, (4 * chunks + 100, w), dtype=np.uint64)
        outside = index.bounds[-1] < 64 * w
        for q in range(4 * chunks):  # per chunk: at R, at R + 1, at R with a bit outside, at R + 1 so
            k0 = q % chunks
            queries[q] = _plant(rng, codes[rng.integers(nx)], index, k0, q // chunks % 2, outside and q >= 2 * chunks)
        dist = sum(np.bitwise_count(queries[:, None, k] ^ codes[None, :, k]) for k in range(w))
        want = set(zip(*np.nonzero(dist <= radius)))
        q, x = index.search(queries)
        assert set(zip(q.tolist(), x.tolist())) == want and len(q) == len(want), (radius, plan)
        planted = [p for p in want if p[0] < 4 * chunks]
        assert len(planted) >= 2 * chunks and all(p[0] // chunks % 2 == 0 for p in planted)  # at R: in; R + 1: out
    assert _plan(64, 8, 18) == ((20, 2), (20, 2), (20, 2))  # the pHash at 250,000 codes: 3 chunks, 2 flips (was 5 x 1)


def test_bad_parts_get_a_clear_error(ray_local, tmp_path):
    table, _ = synthetic_pool(40)
    write_parts(table.drop_columns(["dhash"]), tmp_path / "parts", 1)
    with pytest.raises(ValueError, match="dhash"):
        partitioned_duplicates(folder_sources(tmp_path / "parts"), DedupConfig(), tmp_path / "work", SMALL)
    with pytest.raises(FileNotFoundError):
        folder_sources(tmp_path / "empty")


def _copies_folder(folder, photos: int = 8) -> None:
    """Real photos, each with its copies (lvd.curation.copies), plus a lossless twin of one
    (other bytes, same pixels: the exact pass)."""
    folder.mkdir()
    for seed, (name, img) in enumerate(real_photos()[:photos]):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (folder / f"{name}-orig.png").write_bytes(buf.getvalue())
        for kind, data in make_copies(img, seed=seed).items():
            (folder / f"{name}-{kind}.img").write_bytes(data)
        if seed == 0:
            buf = io.BytesIO()
            img.save(buf, format="BMP")
            (folder / f"{name}-twin.bmp").write_bytes(buf.getvalue())


def test_run_folder_partitioned_equals_single_task_on_real_copies(ray_local, tmp_path):
    _copies_folder(tmp_path / "in")
    single, shuffled = tmp_path / "single", tmp_path / "shuffled"
    stages.run_ingest(stages.plan([str(tmp_path / "in")], 9), single, stages.IngestConfig())
    shutil.copytree(single, shuffled)
    stages.run_dedup(single, DedupConfig(), partitioned=False)
    report = stages.run_dedup(shuffled, DedupConfig(), partitioned=True, shuffle=SMALL)
    want, got = rundir.hash_duplicates(single), rundir.hash_duplicates(shuffled)
    assert want.num_rows >= 20 and got.equals(want)
    rec = rundir.read_ingest(single, ["source", "uid"])
    uid = {os.path.basename(s): u for s, u in zip(rec["source"].to_pylist(), rec["uid"].to_pylist())}
    rep = dict(zip(got["uid"].to_pylist(), got["duplicate_of"].to_pylist()))
    group = {name: rep.get(u, u) for name, u in uid.items()}
    first = real_photos()[0][0]
    assert group[f"{first}-twin.bmp"] == group[f"{first}-orig.png"] == group[f"{first}-resized.img"]
    assert report.ran == [0] and not (shuffled / "dedup" / "shuffle").exists()
    marker = rundir.markers(shuffled / "dedup")[0]
    assert marker["config_hash"] == rundir.markers(single / "dedup")[0]["config_hash"]
    assert stages.run_dedup(shuffled, DedupConfig(), partitioned=True).skipped == [0]  # resumes as done


def test_pool_size_picks_the_path(ray_local, tmp_path):
    """partitioned=None shuffles from `min_records` ingest records on; True / False force a path."""
    _copies_folder(tmp_path / "in", photos=2)
    run = tmp_path / "run"
    stages.run_ingest(stages.plan([str(tmp_path / "in")], 9), run, stages.IngestConfig())
    n = stages._ingest_records(run)
    assert n > 0
    assert not stages.shuffles(run, None, min_records=n + 1)
    assert stages.shuffles(run, None, min_records=n)
    assert not stages.shuffles(run, None)  # the default threshold is far above a test pool
    assert stages.shuffles(run, True, min_records=n + 1) and not stages.shuffles(run, False, min_records=n)


# ---------------------------------------------------------------- components


def _edge_files(folder, a, b, pixels: dict, dist, parts: int = 3) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, s in enumerate(np.array_split(np.arange(len(a)), parts)):
        t = pa.table({
            "uid_a": [a[j] for j in s], "uid_b": [b[j] for j in s],
            "pixels_a": [pixels[a[j]] for j in s], "pixels_b": [pixels[b[j]] for j in s],
            "channel": ["x"] * len(s), "distance": [float(dist[j]) for j in s],
        })  # fmt: skip
        files.append(folder / f"e{i}.parquet")
        pq.write_table(t, files[-1])
    return files


def _resolved(report) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in report.outputs]).sort_by("uid")


def test_chain_converges_in_log_steps_to_the_single_process_representative(ray_local, tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    uids = [f"u{i:05d}" for i in rng.permutation(n)]  # ranks in random order along the path
    pixels = dict(zip(uids, rng.integers(1, 4, n).tolist()))
    dist = rng.integers(0, 9, n - 1)
    files = _edge_files(tmp_path / "edges", uids[:-1], uids[1:], pixels, dist)
    report = components(files, tmp_path / "work", ComponentsConfig(partitions=3))
    want = resolve(uids, [pixels[u] for u in uids], [EdgeSet("phash", np.arange(n - 1), np.arange(1, n), dist)])
    got = _resolved(report)
    assert got.equals(want.select(["uid", "duplicate_of", "distance"]))
    assert report.phases <= rounds_bound(n), report.changed  # min-label propagation needs ~n rounds here


def test_random_graphs_equal_resolve(ray_local, tmp_path):
    """Several components, repeated edges and both directions, pixel ties broken by uid."""
    rng = np.random.default_rng(1)
    n, m = 300, 260
    uids = [f"{x:064x}" for x in rng.integers(0, 2**62, n)]
    pixels = dict(zip(uids, rng.choice([100, 200, 300], n).tolist()))
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    keep = a != b
    a, b, dist = a[keep], b[keep], rng.integers(0, 9, keep.sum()).astype(float)
    a, b, dist = np.r_[a, b[:20]], np.r_[b, a[:20]], np.r_[dist, dist[:20] + 1]  # repeats, both ways
    files = _edge_files(tmp_path / "edges", [uids[i] for i in a], [uids[i] for i in b], pixels, dist, parts=4)
    report = components(files, tmp_path / "work", ComponentsConfig(partitions=4))
    want = resolve(uids, [pixels[u] for u in uids], [EdgeSet("phash", np.minimum(a, b), np.maximum(a, b), dist)])
    assert want.num_rows > 100 and len(set(want["duplicate_of"].to_pylist())) > 5
    assert _resolved(report).equals(want.select(["uid", "duplicate_of", "distance"]))


# ---------------------------------------------------------------- a 3-node cluster

CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster
    from lvd.curation.dedup import DedupConfig
    from lvd.curation.scale.hashdedup import ShuffleConfig, folder_sources, partitioned_duplicates

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        folder = Path(sys.argv[1])
        shuffle = ShuffleConfig(buckets=4, exact_buckets=3, partitions=3)
        rep = partitioned_duplicates(folder_sources(folder / "parts"), DedupConfig(), folder / "work", shuffle)
        got = pq.read_table(rep.duplicates)
        print("RESULT " + json.dumps({"equal": got.equals(pq.read_table(folder / "want.parquet")),
                                      "rows": got.num_rows, "nodes": len(ray.nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_three_node_cluster_equals_single_process(tmp_path):
    table, _ = synthetic_pool(600, seed=3)
    write_parts(table, tmp_path / "parts", 4)
    want = find_near_duplicates(table, DedupConfig())
    pq.write_table(want, tmp_path / "want.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    assert json.loads(lines[0][len("RESULT ") :]) == {"equal": True, "rows": want.num_rows, "nodes": 3}
