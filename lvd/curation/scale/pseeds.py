"""Retrieval with seed sets (sample or cluster based) with no process holding the pool.

Sample based (the k nearest candidates of every seed), under a scratch folder
(`RUN/retrieve/_work`, dropped after):

1. The pool's candidates are found by uid buckets (`pcluster.find_candidates`) and numbered in
   store-row order; `shardindex.build` spreads them over Ray actors, each of which reads its own
   vector parts' candidate rows (`CandidateRows.part_rows`). So are each seed set's.
2. The driver reads a seed set a chunk at a time (`CHUNK` seeds: their uids and vectors, from the
   seed run's store rows), asks the shards for the k nearest candidates, and writes the hits
   (candidate number, seed uid, similarity) by candidate range.
3. dedup, a task per candidate range: per set, each candidate once, with its most similar seed
   (ties: the smaller seed uid); it maps candidate numbers to uids (its range's store rows) and
   counts hits and collisions. Where a set has a cap (`target`), it returns a histogram of its
   similarities.
4. The driver finds each capped set's cut (the cap-th best by similarity, ties by smaller uid):
   the histogram's bin, then the rows of that one bin (a second wave).
5. keep, a task per candidate range: each set's rows within its cut, unioned over the sets in
   name order (the first set's provenance), written by uid range (`pretrieve.write_ranges`).
6. One task writes `selection.parquet` a uid range at a time (`pretrieve.merge_selection`).

Cluster based: the seeds are assigned to the level-1 centroids a chunk at a time (the driver
holds one count per cluster), each set's quota per cluster follows as in `retrieve.cluster_based`,
and `pretrieve`'s map and take draw them (each leaf's smallest `hierarchical.uid_keys`).

Both give the one-task stage's table (`stages.retrieve`) row for row when the index is exact;
an IVF index numbers its training sample by candidate number, so it differs as IVF does.

Memory: a shard holds its vectors (`shardindex`); the driver one chunk of seeds and its hits
(CHUNK * k rows), the histograms (HIST_BINS per capped set) and one boundary bin's rows; a range
task its range's hits. With `include_seeds`, the seeds table holds the shipped seeds' uids (as
the one task does): it grows with the seed sets, not the pool.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd import durable
from lvd.curation import rundir
from lvd.curation.hierarchical import water_fill
from lvd.curation.kmeans import assign_to_centroids
from lvd.curation.knn_index import as_unit_float32
from lvd.curation.retrieve import RetrievalCounts
from lvd.curation.scale import budget as B
from lvd.curation.scale import pretrieve, shardindex
from lvd.curation.scale.dkmeans import ShardSpec, load_shard
from lvd.curation.scale.pcluster import Candidates, find_candidates
from lvd.curation.scale.poolorder import RECORDS_PER_TASK, tasks_for
from lvd.curation.scale.poolorder import wave as _wave
from lvd.curation.vectors import folder_parts

WORK = "_work"
CHUNK = 16_384  # seeds per query chunk in the driver
HIST_BINS = 65_536  # similarity bins of a capped set's histogram, over [-1, 1]
HITS_SCHEMA = pa.schema(
    [("set", pa.int32()), ("id", pa.int64()), ("seed_uid", pa.string()), ("sim", pa.float32()), ("bucket", pa.int64())]
)


def seeds_partitioned(run_dir: Path, seed_dirs: dict[str, str], method: str, p: dict, unit, stage_dir: Path,
                      cfg_hash: str, opts: dict) -> dict:  # fmt: skip
    """Retrieval with seeds, partitioned; `p`: k, cap (None or images per set), min_seeds,
    per_cluster, include_seeds, seed, knn (a `shardindex.ShardConfig`). Returns the marker."""
    run, stage = Path(run_dir), Path(stage_dir)
    work = stage / WORK
    shutil.rmtree(work, ignore_errors=True)
    names = sorted(seed_dirs)
    seeds = [find_candidates(Path(seed_dirs[n]), rundir.vectors_dir(Path(seed_dirs[n])), work / f"s{i}", opts)
             for i, n in enumerate(names)]  # fmt: skip
    seeds_table = shipped_seeds(run, names, seed_dirs, p["include_seeds"])
    if method != "sample":
        mapped = pretrieve.map_clusters(run, work / "pool", p["seed"], opts)
        sets, counts = _cluster_quotas(mapped, names, seed_dirs, seeds, p)
        marker = pretrieve.take_and_merge(mapped, sets, unit, stage, cfg_hash, opts, counts, seeds_table)
        shutil.rmtree(work, ignore_errors=True)
        return marker
    pool = find_candidates(run, rundir.vectors_dir(run), work / "pool", opts)
    counts = _sample(run, pool, names, seed_dirs, seeds, p, work, opts)
    merge = ray.remote(pretrieve.merge_selection).options(**opts)
    n_ranges = len(pool.bounds) + 1
    marker = ray.get(merge.remote(str(work), n_ranges, unit, str(stage), cfg_hash, counts, seeds_table))
    shutil.rmtree(work, ignore_errors=True)
    return marker


def shipped_seeds(run_dir: Path, names: list[str], seed_dirs: dict, include: bool) -> pa.Table:
    """Seed images to ship with `include_seeds`: every set's queries, the first set (by name)
    winning a uid, none whose bytes are in the pool (the pool's own decision stands for it)."""
    if not include:
        return pretrieve.SEEDS_SCHEMA.empty_table()
    seed_uids = [rundir.candidates(Path(seed_dirs[n])) for n in names]
    in_pool = rundir.ingested(Path(run_dir), {u for us in seed_uids for u in us})  # a partition at a time
    rows: dict[str, tuple[str, str]] = {}
    for name, uids in zip(names, seed_uids):
        for u in uids:
            if u not in in_pool:
                rows.setdefault(u, (name, str(seed_dirs[name])))
    order = sorted(rows)
    return pa.table(
        {"uid": pa.array(order, pa.string()), "seed_set": pa.array([rows[u][0] for u in order], pa.string()),
         "run": pa.array([rows[u][1] for u in order], pa.string())},
        schema=pretrieve.SEEDS_SCHEMA,
    )  # fmt: skip


# ---------------------------------------------------------------- reading a run's candidates


def _chunks(seed_dir: str, cands: Candidates, chunk: int):
    """(uids, float16 vectors) of a run's candidates, `chunk` at a time, in store-row order."""
    npys, _ = folder_parts(rundir.vectors_dir(Path(seed_dir)))
    offsets = np.asarray(cands.rows.store_offsets, np.int64)
    for first in range(0, cands.rows.n, chunk):
        n = min(chunk, cands.rows.n - first)
        rows = cands.rows.rows(first, n)
        # the vectors as a k-means actor reads its shard's (part by part, memory-mapped)
        vecs = load_shard(ShardSpec(first, n, tuple(npys), tuple(int(o) for o in offsets[:-1]), store_rows=rows))
        yield _uids_at(npys, offsets, rows), vecs


def _uids_at(npys, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """object [n]: the uids at store rows `rows`, a vector part's uid file at a time."""
    part = np.searchsorted(offsets, rows, side="right") - 1
    uids = np.empty(len(rows), object)
    for j in np.unique(part):
        sel = part == j
        names = pq.read_table(str(Path(npys[j]).with_suffix(".uids.parquet")), columns=["uid"])["uid"]
        uids[sel] = np.asarray(names.take(pa.array(rows[sel] - offsets[j])).to_pylist(), object)
    return uids


# ---------------------------------------------------------------- sample based


def _sample(run: Path, pool: Candidates, names, seed_dirs, seeds, p: dict, work: Path, opts: dict):
    """Steps 1-5; returns the counts table."""
    k, cap = p["k"], p["cap"]
    n = pool.rows.n
    budget = B.current()
    per_task = B.order_records(budget) if budget is not None else RECORDS_PER_TASK
    hits_total = sum(s.rows.n for s in seeds) * k
    n_ranges = tasks_for(max(n, hits_total), per_task)
    span = max(1, -(-n // n_ranges))
    files = []
    if n:
        with shardindex.build(rundir.vectors_dir(run), pool.rows, p["knn"], k=k) as index:
            for s, (name, cands) in enumerate(zip(names, seeds)):
                for c, (uids, vecs) in enumerate(_chunks(seed_dirs[name], cands, CHUNK)):
                    nb = index.neighbours(as_unit_float32(vecs, "seeds"), k)
                    files.append(_write_hits(work / "hits" / f"s{s:04d}c{c:06d}.parquet", s, uids, nb, span))
    npys = folder_parts(rundir.vectors_dir(run))[0]
    args = [(str(work), r, [str(f) for f in files], span, pool, npys, len(names), cap) for r in range(n_ranges)]
    got = _wave(_dedup, args, opts)
    cuts_sim = _cuts(got, names, cap, work, n_ranges, opts)
    bounds = pool.bounds
    kept = _wave(_keep, [(str(work), r, cuts_sim, names, bounds) for r in range(n_ranges)], opts)
    per_set = np.sum([g[0] for g in kept], axis=0) if kept else np.zeros(len(names), np.int64)
    overlaps = int(sum(g[1] for g in kept))
    rows = []
    for s, name in enumerate(names):
        hits = int(sum(g[s]["hits"] for g in got))
        unique = int(sum(g[s]["unique"] for g in got))
        counts = RetrievalCounts(
            n_seeds=seeds[s].rows.n,
            n_hits=hits,
            n_collisions=int(sum(g[s]["collisions"] for g in got)),
            n_clusters=0,
            n_capped=unique - int(per_set[s]),
            n_selected=int(per_set[s]),
        )
        rows.append(dict(seed_set=name, overlaps=overlaps, **asdict(counts)))
    return pa.Table.from_pylist(rows)


def _write_hits(path: Path, s: int, seed_uids: np.ndarray, nb, span: int) -> Path:
    ok = nb.ids_QK >= 0
    q = np.broadcast_to(np.arange(len(seed_uids))[:, None], nb.ids_QK.shape)[ok]
    ids = nb.ids_QK[ok]
    t = pa.table(
        {"set": pa.array(np.full(len(ids), s, np.int32)), "id": pa.array(ids),
         "seed_uid": pa.array(seed_uids[q].tolist(), pa.string()), "sim": pa.array(nb.sims_QK[ok].astype(np.float32)),
         "bucket": pa.array(ids // span)},
        schema=HITS_SCHEMA,
    ).sort_by("bucket")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, t, row_group_size=16_384)
    return path


def _bins(sim: np.ndarray) -> np.ndarray:
    return np.clip(((sim.astype(np.float64) + 1.0) * (HIST_BINS / 2)).astype(np.int64), 0, HIST_BINS - 1)


def _dedup(work: str, r: int, files: list[str], span: int, pool: Candidates, npys, n_sets: int, cap) -> list[dict]:
    """Step 3 for candidate range r: per set, each candidate's most similar seed (ties: smaller
    seed uid), its uid, the counts, and a histogram of the similarities when the set is capped."""
    where = pc.field("bucket") == r
    tables = [pq.read_table(f, filters=where) for f in files]
    t = pa.concat_tables(tables) if tables else HITS_SCHEMA.empty_table()
    lo = r * span
    rows = pool.rows.rows(lo, max(0, min(span, pool.rows.n - lo)))
    names = _uids_at(npys, np.asarray(pool.rows.store_offsets), rows)
    out, dd = [], []
    for s in range(n_sets):
        h = t.filter(pc.equal(t["set"], s))
        h = h.sort_by([("id", "ascending"), ("sim", "descending"), ("seed_uid", "ascending")])
        ids = h["id"].to_numpy()
        first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
        multiplicity = np.diff(np.r_[np.flatnonzero(first), len(ids)])
        h = h.filter(pa.array(first))
        uids = names[h["id"].to_numpy() - lo] if h.num_rows else np.zeros(0, object)
        dd.append(pa.table({"set": h["set"], "uid": pa.array(uids.tolist(), pa.string()),
                            "seed_uid": h["seed_uid"], "sim": h["sim"]}))  # fmt: skip
        got = {"hits": len(ids), "collisions": int((multiplicity > 1).sum()), "unique": h.num_rows}
        if cap is not None:
            b, c = np.unique(_bins(h["sim"].to_numpy()), return_counts=True)
            got["hist"] = (b, c)
        out.append(got)
    path = Path(work) / "dd" / f"r{r:06d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, pa.concat_tables(dd))
    return out


def _cuts(got: list[list[dict]], names, cap, work: Path, n_ranges: int, opts: dict) -> list:
    """Step 4: per set, None (keep every row) or the last kept (similarity, uid)."""
    cuts: list = [None] * len(names)
    if cap is None:
        return cuts
    edge = {}
    for s in range(len(names)):
        hist = np.zeros(HIST_BINS, np.int64)
        for g in got:
            b, c = g[s]["hist"]
            np.add.at(hist, b, c)
        if hist.sum() <= cap:
            continue
        if cap == 0:
            cuts[s] = (np.float32(np.inf), "")
            continue
        above = np.cumsum(hist[::-1])[::-1] - hist  # rows in higher bins
        b = int(np.flatnonzero((above < cap) & (above + hist >= cap))[-1])
        edge[s] = (b, cap - int(above[b]))
    if edge:
        bins = {s: b for s, (b, _) in edge.items()}
        rows = _wave(_edge_rows, [(str(work), r, bins) for r in range(n_ranges)], opts)
        for s, (_, need) in edge.items():
            sims = np.concatenate([g[s][0] for g in rows])
            uids = np.concatenate([g[s][1] for g in rows])
            order = np.lexsort((uids.astype(str), -sims.astype(np.float64)))
            last = order[need - 1]
            cuts[s] = (np.float32(sims[last]), str(uids[last]))
    return cuts


def _edge_rows(work: str, r: int, bins: dict[int, int]) -> dict:
    t = pq.read_table(Path(work) / "dd" / f"r{r:06d}.parquet")
    out = {}
    for s, b in bins.items():
        h = t.filter(pc.equal(t["set"], s))
        sims = h["sim"].to_numpy()
        sel = _bins(sims) == b
        out[s] = (sims[sel], np.asarray(h["uid"].to_pylist(), object)[sel])
    return out


def _keep(work: str, r: int, cuts: list, names: list[str], bounds: tuple[str, ...]):
    """Step 5 for candidate range r: every set's rows within its cut, the first set's kept."""
    t = pq.read_table(Path(work) / "dd" / f"r{r:06d}.parquet")
    sets = t["set"].to_numpy()
    sims = t["sim"].to_numpy()
    uids = np.asarray(t["uid"].to_pylist(), object)
    ok = np.ones(len(sets), bool)
    for s, cut in enumerate(cuts):
        if cut is not None:
            mine = sets == s
            ok[mine] = (sims[mine] > cut[0]) | ((sims[mine] == cut[0]) & (uids[mine] <= cut[1]))
    kept_per_set = np.bincount(sets[ok], minlength=len(names)).astype(np.int64)
    t = t.filter(pa.array(ok)).sort_by([("uid", "ascending"), ("set", "ascending")])
    u = np.asarray(t["uid"].to_pylist(), object)
    first = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    repeats = np.diff(np.r_[np.flatnonzero(first), len(u)])
    t = t.filter(pa.array(first))
    m = t.num_rows
    out = pa.table(
        {
            "uid": t["uid"],
            "method": pa.array(["sample"] * m, pa.string()),
            "seed_set": pa.array([names[s] for s in t["set"].to_numpy()], pa.string()),
            "seed_uid": t["seed_uid"],
            "cluster_id": pa.array(np.full(m, -1, np.int64)),
            "similarity": pa.array(np.round(t["sim"].to_numpy().astype(np.float32).astype(np.float64), 6)),
        },
        schema=pretrieve.SELECTION_SCHEMA,
    )
    pretrieve.write_ranges(Path(work), f"p{r:06d}", out, bounds)
    return kept_per_set, int((repeats > 1).sum())


# ---------------------------------------------------------------- cluster based


def _cluster_quotas(mapped: pretrieve.MappedClusters, names, seed_dirs, seeds, p: dict):
    """Each set's quota per level-1 cluster (`retrieve.cluster_based`'s rule), and the counts."""
    sets, rows = [], []
    k0 = len(mapped.sizes)
    for name, cands in zip(names, seeds):
        per_cluster = np.zeros(k0, np.int64)
        if k0:
            centroids = mapped.levels[0].centroids_KD
            for _, vecs in _chunks(seed_dirs[name], cands, CHUNK):
                assign, _ = assign_to_centroids(as_unit_float32(vecs, "seeds"), centroids)
                per_cluster += np.bincount(assign, minlength=k0)
        chosen = per_cluster >= p["min_seeds"]
        quota = np.where(chosen, np.minimum(p["per_cluster"], mapped.sizes), 0).astype(np.int64)
        wanted = int(quota.sum())
        if p["cap"] is not None:
            quota = water_fill(quota, p["cap"], np.random.default_rng(p["seed"]))
        sets.append((name, "cluster", quota))
        rows.append((name, cands.rows.n, wanted, int(chosen.sum()), int(quota.sum())))
    overlaps = _cluster_overlaps(mapped, sets)
    table = pa.Table.from_pylist(
        [
            dict(seed_set=name, overlaps=overlaps, **asdict(RetrievalCounts(
                n_seeds=ns, n_hits=wanted, n_collisions=0, n_clusters=nc, n_capped=wanted - got, n_selected=got)))
            for name, ns, wanted, nc, got in rows
        ]
    )  # fmt: skip
    return sets, table


def _cluster_overlaps(mapped: pretrieve.MappedClusters, sets) -> int:
    """Images taken for more than one set: within a leaf, every set takes its smallest keys, so
    two sets share min(quota_a, quota_b) rows there, and more sets their second-largest quota."""
    if len(sets) < 2:
        return 0
    q = np.sort(np.stack([quota for _, _, quota in sets]), axis=0)
    return int(q[-2].sum())
