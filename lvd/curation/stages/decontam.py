"""Decontamination as runner work: remove the pool's copies of eval-set images.

`R/decontam/decontaminated.parquet`: pool images removed because they, or a member of their
duplicate group, are copies of an eval-set image (`uid`, `matched_eval_uid`, `similarity`
(1 - distance, as in `stages.copy`), `eval_set`, `method`). Candidates come from hashes, the
model-free global descriptor and any proposing embedder; pairs are decided by the copy
detection's calibrated `Decider`, except those the hash dedup's own rules link (`hash_matches`:
`dedup.candidate_codes` searched between the eval images and the pool, `dedup.verify_pairs`):
copies without local features, as copy detection takes the hash dedup's links as decided
(method `phash`, similarity 1.0). A soft 120 px face gets fewer inliers than the calibrated
threshold even against its own byte-identical copy; its hashes still match.

Two paths, one output (`run_decontam` picks by pool size, `partitioned=` forces):
- `DecontamFn`: one Ray task reads the whole pool's features: memory O(pool) (the local
  features, ~10-30 KB an image).
- `_run_partitioned` (the section at the end): Ray tasks per copyfeat part, the eval sets
  broadcast once through the object store. A task holds O(eval + one part): the eval sets'
  features, one part's features and vectors, or one bucket of the pool index (uid, source, part,
  row, home: ~150 B a record, RECORD_ROWS_PER_BUCKET a bucket). The driver holds O(eval x k x
  lists) (the merged top k, one part's top k beside it) and O(parts) counts; the finishing task
  holds the matches and their groups' members (at most what is removed, which the guard bounds)
  and streams the duplicate groups in batches. Exact search in every part (a pool above
  `IndexConfig.exact_below` gets IVF in the single task, so there the two may differ: the
  partitioned path is the exact one); tests/curation/test_decontam_scale.py checks byte
  equality on small pools.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd import durable
from lvd.curation import copydetect as cd
from lvd.curation import dedup, rundir, runner, uidbuckets
from lvd.curation.guard import check_removal
from lvd.curation.knn_index import IndexConfig, build_index, search
from lvd.curation.localfeat import Features
from lvd.curation.scale import shardindex
from lvd.curation.scale.hashdedup import Code, SortedIndex, code_versions
from lvd.curation.stages.copy import Decider, PoolFeatures, calibration, duplicates, read_features
from lvd.curation.stages.ingest_dedup import PARTITIONED_MIN_RECORDS
from lvd.curation.vectors import open_vectors, part_paths

DECONTAM_SCHEMA = pa.schema([
    ("uid", pa.string()), ("matched_eval_uid", pa.string()), ("similarity", pa.float64()),
    ("eval_set", pa.string()), ("method", pa.string()),
])  # fmt: skip
HASH_METHOD = "phash"  # the method of a pair the hash dedup links (its own name for its links)
HASH_COLUMNS = ("uid", "width", "height", "phash", "dhash", "phash256", "thumb16", "nphash256", "cphash256", "sat16")


@dataclass(frozen=True)
class DecontamFn:
    run_dir: str
    eval_dirs: dict[str, str]  # eval-set name -> its run folder
    cfg: cd.CopyDetectConfig
    proposers: tuple[tuple[str, dict[str, str]], ...]  # (pool vectors, {eval set: its vectors})
    copy_model: tuple[str, dict] | None
    dedup_cfg: dedup.DedupConfig = dedup.DedupConfig()  # the hash dedup's rules (the run's dedup config)

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        run, cfg = Path(self.run_dir), self.cfg
        cal = calibration(run)
        if cal is None:
            raise RuntimeError(f"{run}/copydetect has no calibration: run copy detection before decontamination")
        pool = read_features(run)
        ev, set_of = _eval_features({k: Path(v) for k, v in self.eval_dirs.items()})
        n, e = len(pool.uids), len(ev.uids)
        if not n or not e:
            return {"": DECONTAM_SCHEMA.empty_table()}
        qa, pb = cd.cross_hash_candidates(ev.nhash, pool.nhash, pool.nhash_flip, cfg.hash_radius)
        ev_hash = _eval_hashes({k: Path(v) for k, v in self.eval_dirs.items()}, ev.uids, set_of)
        hq, hp = hash_matches(ev_hash, _pool_hashes(run, pool.uids), self.dedup_cfg)
        lists = [(ev.glob, pool.glob)]
        for pool_dir, eval_vecs in self.proposers:
            # the pool's vectors stay in their folder (sharded over Ray when large); the eval set is small
            pool_knn = partial(shardindex.knn_lists, pool_dir, pool.uids)
            lists.append((_eval_vectors(ev.uids, set_of, eval_vecs), pool_knn))
        copy_pool = copy_eval = None
        if self.copy_model:
            copy_pool = open_vectors(rundir.vectors_dir(run, "copyembed")).get(pool.uids)
            copy_eval = _eval_vectors(
                ev.uids, set_of, {k: str(rundir.vectors_dir(Path(v), "copyembed")) for k, v in self.eval_dirs.items()}
            )
            lists.append((copy_eval, copy_pool))
        q, p = [qa, hq], [pb, hp]
        for eq, pv in lists:
            search = pv if callable(pv) else partial(cd.knn_lists, np.asarray(pv))
            ids = search(cfg.k, np.asarray(eq), exclude_self=False)
            rows = np.repeat(np.arange(e), ids.shape[1])
            q.append(rows[ids.ravel() >= 0])
            p.append(ids.ravel()[ids.ravel() >= 0])
        key = np.unique(np.concatenate(q) * n + np.concatenate(p))
        q_rows, p_rows = key // n, key % n
        # one table of eval rows then pool rows, so one decider scores eval-pool pairs
        feats = ev.feats + pool.feats
        vecs = None if copy_pool is None else np.concatenate([copy_eval, copy_pool]).astype(np.float32)
        decider = Decider(feats, vecs, cal, cfg)
        scores, hit = _decide_pairs(decider, q_rows, p_rows, e, np.isin(key, hq * n + hp))
        best: dict[int, tuple[float, int]] = {}
        for qi, pi, s in zip(q_rows[hit].tolist(), p_rows[hit].tolist(), scores[hit].tolist()):
            if pi not in best or s > best[pi][0]:
                best[pi] = (s, qi)
        out = _with_components(pool.uids, best, duplicates(run), ev.uids, set_of, decider)
        check_removal(
            "decontamination",
            out.num_rows,
            n,
            cfg.max_remove,
            largest=[[str(pool.uids[r]) for r in list(best)[:8]]],
            detail=cal.summary() + f"; {len(best)} pool images matched {e} eval images. ",
        )
        return {"": out}


def _with_components(uids, best, dups: pa.Table, eval_uids, set_of, decider: Decider) -> pa.Table:
    """Every member of a group one of whose members matched, naming the group's best match."""
    rep = dict(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()))
    label = [rep.get(u, u) for u in uids.tolist()]
    group_best: dict[str, tuple[float, int]] = {}
    for pi, (s, qi) in sorted(best.items()):
        g = label[pi]
        if g not in group_best or s > group_best[g][0]:
            group_best[g] = (s, qi)
    rows = []
    for i, u in enumerate(uids.tolist()):
        hit = best.get(i) or group_best.get(label[i])
        if hit is None:
            continue
        s, qi = hit
        sim, method = _similarity(decider, s)
        rows.append(
            {
                "uid": u,
                "matched_eval_uid": str(eval_uids[qi]),
                "similarity": sim,
                "eval_set": set_of[str(eval_uids[qi])],
                "method": method,
            }
        )
    return pa.Table.from_pylist(rows, schema=DECONTAM_SCHEMA).sort_by([("uid", "ascending")])


def _decide_pairs(decider: Decider, q_rows, p_rows, e: int, hashed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, links) of (eval row, pool row) pairs. Pairs the hash dedup links (`hashed`) are
    copies without local features: score inf, so they win over any verified score (similarity
    1.0, method `phash`); the others are scored and decided by the calibrated decider."""
    scores, hit = np.full(len(q_rows), np.inf), np.asarray(hashed, bool).copy()
    rest = np.flatnonzero(~hit)
    if len(rest):
        scores[rest] = decider.scores(q_rows[rest], p_rows[rest] + e)
        hit[rest] = decider.links(scores[rest])
    return scores, hit


def _similarity(decider: Decider, score: float) -> tuple[float, str]:
    """(similarity, method) of a match's score: a hash-linked pair is (1.0, `phash`)."""
    if score == np.inf:
        return 1.0, HASH_METHOD
    return 1.0 - float(decider.distance(np.array([score]))[0]), decider.method


def hash_matches(ev: pa.Table, pool: pa.Table, cfg: dedup.DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(eval row, pool row), unique, sorted: the pairs the hash dedup would link if both images
    were in one pool. Per channel of `dedup.candidate_codes`, the pairs within its radius (one
    image's code against any code of the other, as dedup's candidates) are checked by
    `dedup.verify_pairs` on the two records. Tables: ingest hash columns (HASH_COLUMNS)."""
    e, n = ev.num_rows, pool.num_rows
    none = np.zeros(0, np.int64)
    if not e or not n:
        return none, none
    cols = [c for c in HASH_COLUMNS if c in ev.column_names and c in pool.column_names]
    rows = dedup.table_rows(pa.concat_tables([ev.select(cols), pool.select(cols).cast(ev.select(cols).schema)]), cfg)
    q, p = [none], [none]
    found: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # channels sharing a search run it once
    for code in dedup.candidate_codes(cfg):
        key = (code.column, code.radius, code.variants)
        if key not in found:
            found[key] = _code_pairs(ev, pool, Code(code.column, code.radius, code.channel, code.variants))
        cq, cp = found[key]
        ok = dedup.verify_pairs(rows, code.channel, cq, cp + e, cfg)
        q.append(cq[ok])
        p.append(cp[ok])
    key = np.unique(np.concatenate(q) * n + np.concatenate(p))
    return key // n, key % n


def _code_pairs(ev: pa.Table, pool: pa.Table, code: Code) -> tuple[np.ndarray, np.ndarray]:
    """(eval row, pool row) with one's `code.column` code within `code.radius` bits of a code of
    the other (its variants too): exact, by the partitioned dedup's pigeonhole index
    (`scale.hashdedup`), over the eval codes (small), queried by the pool's codes. O(pool) work,
    never eval x pool comparisons."""
    ve, vp = code_versions(ev, code), code_versions(pool, code)  # uint64 [rows, versions, words]
    k, w, n = ve.shape[1], ve.shape[2], len(vp)
    pi, qv = SortedIndex(ve.reshape(-1, w), code.radius).search(vp[:, 0])  # pool code vs every eval code
    q, p = [qv // k], [pi]
    if k > 1:  # every pool code vs the eval images' `column` codes
        pv, qi = SortedIndex(np.ascontiguousarray(ve[:, 0]), code.radius).search(vp.reshape(-1, w))
        q.append(qi)
        p.append(pv // k)
    key = np.unique(np.concatenate(q) * n + np.concatenate(p))
    return key // n, key % n


def _hash_table(t: pa.Table, uids, where: str) -> pa.Table:
    """`t`'s rows of `uids` in that order (one per uid), the hash columns only."""
    pos = {u: i for i, u in enumerate(t["uid"].to_pylist())}
    if missing := [u for u in uids if u not in pos]:
        raise RuntimeError(f"{where}: no accepted ingest record for {len(missing)} images, e.g. {missing[:3]}")
    return t.select([c for c in HASH_COLUMNS if c in t.column_names]).take(pa.array([pos[u] for u in uids], pa.int64()))


def _pool_hashes(run_dir: Path, uids: np.ndarray) -> pa.Table:
    return _hash_table(rundir.unique_accepted(run_dir), uids.tolist(), str(run_dir))


def _eval_hashes(eval_dirs: dict[str, Path], uids: np.ndarray, set_of: dict[str, str]) -> pa.Table:
    """The eval images' ingest hash records, in `uids` order (each from its set's run)."""
    parts, order = [], []
    for name in sorted(eval_dirs):
        mine = [u for u in uids.tolist() if set_of[u] == name]
        if mine:
            parts.append(_hash_table(rundir.unique_accepted(eval_dirs[name]), mine, str(eval_dirs[name])))
            order += mine
    if not parts:
        return pa.table({"uid": pa.array([], pa.string())})
    row = {u: i for i, u in enumerate(order)}
    return pa.concat_tables(parts).take(pa.array([row[u] for u in uids.tolist()], pa.int64()))


def _eval_features(eval_dirs: dict[str, Path]) -> tuple[PoolFeatures, dict[str, str]]:
    """Every accepted eval image once (first set by name wins), and uid -> its set."""
    parts, set_of = [], {}
    for name in sorted(eval_dirs):
        f = read_features(eval_dirs[name])
        keep = [i for i, u in enumerate(f.uids.tolist()) if u not in set_of]
        for i in keep:
            set_of[f.uids[i]] = name
        parts.append((f, keep))
    uids = np.array([f.uids[i] for f, k in parts for i in k], dtype=object)
    feats = [f.feats[i] for f, k in parts for i in k]
    pix = np.array([f.pixels[i] for f, k in parts for i in k], np.int64)
    asp = np.array([f.aspect[i] for f, k in parts for i in k], np.float64)
    glob = np.concatenate([f.glob[k] for f, k in parts]) if parts else np.zeros((0, 144), np.float32)
    nh = np.concatenate([f.nhash[k] for f, k in parts]) if parts else np.zeros((0, 32), np.uint8)
    nf = np.concatenate([f.nhash_flip[k] for f, k in parts]) if parts else np.zeros((0, 32), np.uint8)
    return PoolFeatures(uids, pix, asp, feats, glob, nh, nf), set_of


def _eval_vectors(uids: np.ndarray, set_of: dict[str, str], dirs: dict[str, str]) -> np.ndarray:
    stores = {name: open_vectors(d) for name, d in dirs.items()}
    return (
        np.concatenate([stores[set_of[u]].get([u]) for u in uids.tolist()])
        if len(uids)
        else np.zeros((0, 1), np.float16)
    )


def run_decontam(
    run_dir: Path,
    eval_dirs: dict[str, Path],
    cfg: cd.CopyDetectConfig,
    *,
    proposer: str | None = None,
    copy_model: tuple[str, dict] | None = None,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    partitioned: bool | None = None,
    buckets: int | None = None,
    dedup_cfg: dedup.DedupConfig | None = None,
) -> runner.StageReport:
    """Remove the pool's copies of eval images (`proposer`: the vector folder name, e.g.
    "vectors", of an embedder that also proposes candidates). `dedup_cfg`: the hash dedup's
    rules (the run's dedup config; None: the default): pairs they link are copies undecided by
    local features.

    Two paths, one output (tests/curation/test_decontam_scale.py checks they are equal): one
    Ray task holding the pool (`DecontamFn`), or Ray tasks per pool part (`_run_partitioned`).
    `partitioned` True / False forces one; None partitions from PARTITIONED_MIN_RECORDS ingest
    records on. `buckets`: pool-index buckets of the partitioned path (None: from the records)."""
    names = sorted(eval_dirs)
    dirs = [rundir.stage_dir(run_dir, "copydetect")] + [rundir.stage_dir(eval_dirs[n], "copyfeat") for n in names]
    proposers: tuple = ()
    if proposer:
        proposers = ((str(run_dir / proposer), {n: str(eval_dirs[n] / proposer) for n in names}),)
        dirs += [rundir.stage_dir(d, "embed") for d in (run_dir, *[eval_dirs[n] for n in names])]
    if copy_model:
        dirs += [rundir.stage_dir(d, "copyembed") for d in (run_dir, *[eval_dirs[n] for n in names])]
    unit = runner.WholeStage(fingerprint=rundir.digest(*dirs), stem="decontaminated")
    dcfg = dedup_cfg or dedup.DedupConfig()
    fn = DecontamFn(str(run_dir), {k: str(v) for k, v in eval_dirs.items()}, cfg, proposers, copy_model, dcfg)
    cfg_hash = runner.config_hash(cfg, names, copy_model, proposer, dcfg)  # both paths: same outputs, same identity
    if partitions(run_dir, partitioned):
        return _run_partitioned(fn, unit, cfg_hash, rcfg, buckets)
    return runner.map_partitions(fn, [unit], rundir.stage_dir(run_dir, "decontam"), cfg_hash=cfg_hash, runner=rcfg)


# ---------------------------------------------------------------- the partitioned path
#
# No process holds the pool. Four waves of Ray tasks over scratch Parquet under RUN/decontam/work:
# 0. pool index: each ingest partition's accepted records (caps applied) and each copyfeat part's
#    uids go to `buckets` files by crc32(uid); a task per bucket keeps each uid's first record in
#    source order (`rundir.unique_accepted`'s row order: (source, ingest part, row)) and its
#    features' part (the first copyfeat part holding it, as `read_features`): the pool, by home part.
# 1. candidates: a task per copyfeat part reads its members' features (and vectors) and searches
#    the eval images among them: each eval image's top k per list, written as (list, eval row,
#    similarity, order key, uid) rows. The driver merges these files one at a time into each
#    eval image's global top k (ties by the order key: the single search's lower row). An embedder
#    proposer's pool vectors are searched here too, part by part, with the same canonical exact
#    search as `scale.shardindex` (whose `knn_lists` takes the pool's uid list: O(pool) in the caller).
# 2. decide: a task per part links the eval images to its members the hash dedup's rules link
#    (`hash_matches`, its members' ingest hash records read at their (part, row)), and verifies
#    its other hash candidates and the merged k-NN pairs that fall in it with the calibrated
#    Decider; each matched pool image keeps its best eval image.
# 3. finish: one task joins the matches with the duplicate groups (streamed in batches), checks
#    the guard and writes decontaminated.parquet and its marker as the single task would.

_ORDER = [("source", "ascending"), ("part", "ascending"), ("row", "ascending")]
INDEX_SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("part", pa.int64()), ("row", pa.int64()), ("home", pa.int64()),
])  # fmt: skip
_FEAT_PART = re.compile(r"part-(\d{6})\.parquet$")
RECORD_ROWS_PER_BUCKET = 2_000_000
_GROUP_ROWS = 16_384  # scratch row groups: a filter on bucket / home reads only the groups in range  # pool-index records one bucket task holds (~150 B each)


@dataclass(frozen=True)
class EvalSide:
    """Everything about the eval sets a partition task needs: one object in the object store."""

    feats: PoolFeatures
    set_of: dict[str, str]
    queries: list[np.ndarray]  # per k-NN list after the model-free descriptor: the eval vectors
    copy_vecs: np.ndarray | None
    hashes: pa.Table | None = None  # the eval images' ingest hash records (HASH_COLUMNS), in feats.uids order


@dataclass(frozen=True)
class PartJob:
    """Picklable task settings shared by the partition waves."""

    run_dir: str
    work: str
    cfg: cd.CopyDetectConfig
    lists: tuple[str, ...]  # vector folders of the pool, per k-NN list after the descriptor
    copy_vecs: str | None  # the copy model's vector folder of the pool
    cal: cd.Calibration | None = None
    dedup_cfg: dedup.DedupConfig = dedup.DedupConfig()  # the hash dedup's rules


def partitions(run_dir: Path, force: bool | None = None) -> bool:
    """Whether `run_decontam` takes the partitioned path: `force`, else from
    PARTITIONED_MIN_RECORDS ingest records on (the dedup stage's threshold)."""
    if force is not None:
        return force
    return sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values()) >= PARTITIONED_MIN_RECORDS


def _index_map(job: PartJob, item: tuple[int, str | None, str | None], buckets: int) -> None:
    """Wave 0 map: one ingest partition's accepted records and one copyfeat part's uids, by bucket."""
    index, manifest, feats = item
    out = Path(job.work) / "map"
    if manifest:
        t = rundir.apply_caps(Path(job.run_dir), pq.read_table(manifest, columns=["uid", "status", "source"]))
        rows = np.flatnonzero(t["status"].to_numpy(zero_copy_only=False) == "accepted")
        rec = pa.table({
            "uid": t["uid"].take(rows), "source": t["source"].take(rows),
            "part": np.full(len(rows), index, np.int64), "row": rows.astype(np.int64),
        })  # fmt: skip
        uidbuckets.write_sorted(rec, out / f"r{index:06d}.parquet", buckets)
    if feats:
        uids = pq.read_table(feats, columns=["uid"])["uid"]
        home = pa.table({"uid": uids, "home": np.full(len(uids), index, np.int64)})
        uidbuckets.write_sorted(home, out / f"h{index:06d}.parquet", buckets)


def _write(t: pa.Table, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, t, **kwargs)  # whole files by rename: a retried task leaves no half file


def _index_reduce(job: PartJob, bucket: int) -> dict[int, int]:
    """Wave 0 reduce: one bucket's pool uids with their order key and home part; -> members per home."""
    d, mine = Path(job.work) / "map", pc.field("bucket") == bucket
    rec = _concat(
        [pq.read_table(p, filters=mine) for p in sorted(d.glob("r*.parquet"))], ["uid", "source", "part", "row"]
    )
    homes = _concat([pq.read_table(p, filters=mine) for p in sorted(d.glob("h*.parquet"))], ["uid", "home"])
    rec = rec.sort_by([("uid", "ascending"), *_ORDER])
    u = rec["uid"].to_numpy(zero_copy_only=False)
    rec = rec.filter(pa.array(np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)))
    home = homes.group_by("uid").aggregate([("home", "min")]).rename_columns(["uid", "home"])
    pool = rec.join(home, "uid", join_type="left outer")
    if (missing := pool.filter(pc.is_null(pool["home"]))).num_rows:
        first = min(missing["uid"].to_pylist())
        raise RuntimeError(
            f"{job.run_dir}/copyfeat has no features for {missing.num_rows} accepted images "
            f"(first {first}): the copyfeat stage did not finish"
        )
    pool = pool.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA).sort_by([("home", "ascending"), *_ORDER])
    _write(pool, Path(job.work) / "pool" / f"b{bucket:05d}.parquet", row_group_size=_GROUP_ROWS)  # home ranges
    counts = pool.group_by("home").aggregate([("uid", "count")])
    return dict(zip(counts["home"].to_pylist(), counts["uid_count"].to_pylist()))


def _concat(tables: list[pa.Table], names: list[str]) -> pa.Table:
    return pa.concat_tables([t.select(names) for t in tables]) if tables else pa.table({n: [] for n in names})


@dataclass
class Part:
    """One home part's pool members in pool order, with their features (and vectors)."""

    keys: pa.Table  # INDEX_SCHEMA rows
    feats: PoolFeatures
    vecs: list[np.ndarray]  # per k-NN list after the descriptor
    copy_vecs: np.ndarray | None


def _load_part(job: PartJob, home: int) -> Part:
    pools = sorted((Path(job.work) / "pool").glob("b*.parquet"))
    keys = pa.concat_tables([pq.read_table(p, filters=pc.field("home") == home) for p in pools]).sort_by(_ORDER)
    uids = keys["uid"].to_pylist()
    path = rundir.stage_dir(Path(job.run_dir), "copyfeat") / f"{runner.part_name(home)}.parquet"
    t = pq.read_table(path, filters=pc.field("uid").isin(pa.array(uids, pa.string())))
    rows: dict[str, dict] = {}
    for r in t.to_pylist():
        rows.setdefault(r["uid"], r)
    ordered = [rows[u] for u in uids]
    n = len(ordered)
    glob = np.stack([np.frombuffer(r["glob"], np.float32) for r in ordered]) if n else np.zeros((0, 144), np.float32)
    nh = np.frombuffer(b"".join(r["nhash"] for r in ordered), np.uint8).reshape(n, 32)
    nf = np.frombuffer(b"".join(r["nhash_flip"] for r in ordered), np.uint8).reshape(n, 32)
    none = np.zeros(n, np.int64)  # pixels / aspect: not used by decontamination
    feats = PoolFeatures(np.asarray(uids, dtype=object), none, none.astype(np.float64),
                         [Features.from_row(r) for r in ordered], glob, nh, nf)  # fmt: skip
    vecs = [_part_vectors(d, home, uids) for d in job.lists]
    copy = _part_vectors(job.copy_vecs, home, uids) if job.copy_vecs else None
    return Part(keys, feats, vecs, copy)


def _part_vectors(folder: str, home: int, uids: list[str]) -> np.ndarray:
    """float16 [len(uids), D]: the vectors of `uids`, read from the store part of the same index
    (the embedder's part of that ingest partition holds them) and, for any not there, from the
    other parts one at a time; never the whole store's uid list."""
    want = {u: i for i, u in enumerate(uids)}
    out: np.ndarray | None = None
    left = set(uids)
    npy0, _ = part_paths(folder, home)
    others = sorted(p for p in Path(folder).glob("part-*.npy") if p != npy0)
    for npy in [npy0, *others] if npy0.exists() else others:
        if not left:
            break
        have = pq.read_table(npy.with_suffix(".uids.parquet"), columns=["uid"])["uid"].to_pylist()
        hit = [(r, want[u]) for r, u in enumerate(have) if u in left]
        if not hit:
            continue
        vecs = np.load(npy, mmap_mode="r", allow_pickle=False)
        if out is None:
            out = np.zeros((len(uids), vecs.shape[1]), np.float16)
        src, dst = np.array([h[0] for h in hit]), np.array([h[1] for h in hit])
        out[dst] = vecs[src]
        left -= {uids[d] for d in dst.tolist()}
    if left:
        raise KeyError(f"{folder}: no vector for {len(left)} pool images, e.g. {sorted(left)[:3]}")
    return out if out is not None else np.zeros((0, 1), np.float16)


KNN_SCHEMA = pa.schema([
    ("list", pa.int64()), ("q", pa.int64()), ("sim", pa.float32()), ("source", pa.string()), ("part", pa.int64()),
    ("row", pa.int64()), ("uid", pa.string()), ("home", pa.int64()),
])  # fmt: skip


def _candidates(job: PartJob, home: int, ev: EvalSide) -> str:
    """Wave 1: each eval image's top k among this part, per k-NN list (rows in pool order, so a
    tie goes to the lower row as in one search over the pool)."""
    part = _load_part(job, home)
    lists = [(ev.feats.glob, part.feats.glob), *zip(ev.queries, part.vecs)]
    if part.copy_vecs is not None:
        lists.append((ev.copy_vecs, part.copy_vecs))
    out = []
    n = part.keys.num_rows
    for li, (q, pool) in enumerate(lists):
        if not n or not len(q):
            continue
        index = build_index(np.asarray(pool), IndexConfig(exact_below=n + 1, use_gpu=False))
        nb = search(index, np.asarray(q), min(job.cfg.k, n))
        qi, ids = np.nonzero(nb.ids_QK >= 0)
        rows = nb.ids_QK[qi, ids]
        t = part.keys.take(pa.array(rows))
        out.append(pa.table({
            "list": np.full(len(rows), li, np.int64), "q": qi.astype(np.int64), "sim": nb.sims_QK[qi, ids],
            "source": t["source"], "part": t["part"], "row": t["row"], "uid": t["uid"], "home": t["home"],
        }, schema=KNN_SCHEMA))  # fmt: skip
    path = Path(job.work) / "knn" / f"{runner.part_name(home)}.parquet"
    _write(pa.concat_tables(out) if out else KNN_SCHEMA.empty_table(), path)
    return str(path)


def _top_k(t: pa.Table, k: int) -> pa.Table:
    """Each (list, eval row)'s k best: similarity descending, then pool order."""
    t = t.sort_by([("list", "ascending"), ("q", "ascending"), ("sim", "descending"), *_ORDER])
    g = t["list"].to_numpy() * (1 << 32) + t["q"].to_numpy()
    if not len(g):
        return t
    start = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(len(g)) - np.repeat(start, np.diff(np.r_[start, len(g)]))
    return t.filter(pa.array(rank < k))


MATCH_SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("part", pa.int64()), ("row", pa.int64()),
    ("score", pa.float64()), ("q", pa.int64()), ("first_q", pa.int64()),
])  # fmt: skip


def _decide(job: PartJob, item: tuple[int, pa.Table], ev: EvalSide) -> tuple[str, int]:
    """Wave 2: decide this part's hash candidates and its merged k-NN pairs; each matched pool
    image keeps its best eval image (the lower eval row on a tie) and its first hit's eval row."""
    home, knn = item
    part = _load_part(job, home)
    n, e, cfg = part.keys.num_rows, len(ev.feats.uids), job.cfg
    qa, pb = cd.cross_hash_candidates(ev.feats.nhash, part.feats.nhash, part.feats.nhash_flip, cfg.hash_radius)
    hq = hp = np.zeros(0, np.int64)
    if ev.hashes is not None:
        hq, hp = hash_matches(ev.hashes, _part_hashes(job, part.keys), job.dedup_cfg)
    row_of = {u: i for i, u in enumerate(part.feats.uids.tolist())}
    kq = knn["q"].to_numpy().astype(np.int64)
    kp = np.array([row_of[u] for u in knn["uid"].to_pylist()], np.int64)
    key = np.unique(np.concatenate([qa * n + pb, hq * n + hp, kq * n + kp]))
    q_rows, p_rows = key // max(n, 1), key % max(n, 1)
    feats = ev.feats.feats + part.feats.feats
    vecs = None
    if part.copy_vecs is not None:
        vecs = np.concatenate([ev.copy_vecs, part.copy_vecs]).astype(np.float32)
    decider = Decider(feats, vecs, job.cal, cfg)
    scores, hit = _decide_pairs(decider, q_rows, p_rows, e, np.isin(key, hq * n + hp))
    best: dict[int, tuple[float, int, int]] = {}
    for qi, pi, s in zip(q_rows[hit].tolist(), p_rows[hit].tolist(), scores[hit].tolist()):
        if pi not in best:
            best[pi] = (s, qi, qi)
        elif s > best[pi][0]:
            best[pi] = (s, qi, best[pi][2])
    rows = sorted(best)
    t = part.keys.take(pa.array(rows, pa.int64()))
    out = pa.table({
        "uid": t["uid"], "source": t["source"], "part": t["part"], "row": t["row"],
        "score": [best[r][0] for r in rows], "q": [best[r][1] for r in rows], "first_q": [best[r][2] for r in rows],
    }, schema=MATCH_SCHEMA)  # fmt: skip
    path = Path(job.work) / "match" / f"{runner.part_name(home)}.parquet"
    _write(out, path)
    return str(path), len(rows)


def _part_hashes(job: PartJob, keys: pa.Table) -> pa.Table:
    """The ingest hash records of a part's members (keys: INDEX_SCHEMA rows), in keys' order:
    each read at its (ingest part, row), one ingest partition's hash columns at a time."""
    run = Path(job.run_dir)
    manifests = dict(zip(sorted(rundir.ingest_markers(run)), rundir.ingest_manifests(run)))
    part, row = keys["part"].to_numpy(), keys["row"].to_numpy()
    pieces, order = [], []
    for i in np.unique(part).tolist():
        cols = [c for c in HASH_COLUMNS if c in pq.read_schema(manifests[i]).names]
        sel = np.flatnonzero(part == i)
        pieces.append(pq.read_table(manifests[i], columns=cols).take(pa.array(row[sel])))
        order.append(sel)
    if not pieces:
        return pa.table({"uid": pa.array([], pa.string())})
    return pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def _finish(job: PartJob, item: tuple, ev: EvalSide) -> dict:
    """Wave 3: matches -> groups -> guard -> decontaminated.parquet and its marker."""
    matches, n, unit, stage_dir, cfg_hash = item
    e = len(ev.feats.uids)
    if not n or not e:
        return runner.write_outputs({"": DECONTAM_SCHEMA.empty_table()}, unit, stage_dir, cfg_hash)
    m = _concat([pq.read_table(p) for p in matches], MATCH_SCHEMA.names).cast(MATCH_SCHEMA)
    decider = Decider([], None if ev.copy_vecs is None else ev.copy_vecs, job.cal, job.cfg)
    out = _groups_of(job, m, ev, decider)
    first = m.sort_by([("first_q", "ascending"), *_ORDER])["uid"].to_pylist()[:8]
    check_removal(
        "decontamination",
        out.num_rows,
        n,
        job.cfg.max_remove,
        largest=[first],
        detail=job.cal.summary() + f"; {m.num_rows} pool images matched {e} eval images. ",
    )
    return runner.write_outputs({"": out}, unit, stage_dir, cfg_hash)


def _groups_of(job: PartJob, m: pa.Table, ev: EvalSide, decider: Decider, rows: int = 65_536) -> pa.Table:
    """`_with_components` without the pool: the matched images (small: what the guard bounds)
    are joined with the duplicate groups read in batches; group members are looked up in the pool
    index (only pool images are removed). Holds the matches, their groups and the output rows."""
    m = m.sort_by(_ORDER)  # pool order: a group's tie goes to its first matched image, as in one pass
    best = dict(zip(m["uid"].to_pylist(), zip(m["score"].to_pylist(), m["q"].to_pylist())))
    path = rundir.duplicates_file(Path(job.run_dir))
    label = {u: u for u in best}
    for uid, rep in _dup_batches(path, rows):
        for u, r in zip(uid, rep):
            if u in label:
                label[u] = r
    group_best: dict[str, tuple[float, int]] = {}
    for u, hit in best.items():
        g = label[u]
        if g not in group_best or hit[0] > group_best[g][0]:
            group_best[g] = hit
    member, relabelled = {}, set()  # member uid -> its group; groups whose label is itself a member elsewhere
    for uid, rep in _dup_batches(path, rows):
        for u, r in zip(uid, rep):
            if r in group_best:
                member[u] = r
            if u in group_best:
                relabelled.add(u)  # rep.get(g, g) != g: g is not in its own group
    for g in group_best:
        if g not in relabelled:
            member.setdefault(g, g)
    in_pool = _pool_members(job, set(member) - set(best))
    rows = []
    for u in sorted(set(best) | in_pool):
        s, qi = best.get(u) or group_best[member[u]]
        euid = str(ev.feats.uids[qi])
        sim, method = _similarity(decider, s)
        rows.append(dict(uid=u, matched_eval_uid=euid, similarity=sim, eval_set=ev.set_of[euid], method=method))
    return pa.Table.from_pylist(rows, schema=DECONTAM_SCHEMA).sort_by([("uid", "ascending")])


def _dup_batches(path: Path | None, rows: int = 65_536):
    if path is None:
        return
    for b in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=["uid", "duplicate_of"]):
        yield b.column(0).to_pylist(), b.column(1).to_pylist()


def _pool_members(job: PartJob, uids: set[str]) -> set[str]:
    if not uids:
        return set()
    want = pc.field("uid").isin(pa.array(sorted(uids), pa.string()))
    found = set()
    for p in sorted((Path(job.work) / "pool").glob("b*.parquet")):
        found |= set(pq.read_table(p, columns=["uid"], filters=want)["uid"].to_pylist())
    return found


def _map(rcfg: runner.RunnerConfig, fn, job: PartJob, items: list, *shared) -> list:
    """[fn(job, x, *shared) for x in items] as Ray tasks, at most `max_in_flight` at once."""
    remote = ray.remote(fn).options(num_cpus=rcfg.num_cpus, max_retries=rcfg.max_retries, retry_exceptions=False)
    limit = rcfg.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    job_ref = ray.put(job)
    results: dict[int, object] = {}
    pending: dict = {}
    for i, x in enumerate(items):
        while len(pending) >= limit:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[remote.remote(job_ref, x, *shared)] = i
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
    return [results[i] for i in range(len(items))]


def _eval_side(fn: DecontamFn) -> EvalSide:
    ev, set_of = _eval_features({k: Path(v) for k, v in fn.eval_dirs.items()})
    queries = [_eval_vectors(ev.uids, set_of, eval_vecs) for _, eval_vecs in fn.proposers]
    copy = None
    if fn.copy_model:
        dirs = {k: str(rundir.vectors_dir(Path(v), "copyembed")) for k, v in fn.eval_dirs.items()}
        copy = _eval_vectors(ev.uids, set_of, dirs)
    hashes = _eval_hashes({k: Path(v) for k, v in fn.eval_dirs.items()}, ev.uids, set_of)
    return EvalSide(ev, set_of, queries, copy, hashes)


def _run_partitioned(
    fn: DecontamFn, unit: runner.WholeStage, cfg_hash: str, rcfg: runner.RunnerConfig, buckets: int | None
) -> runner.StageReport:
    """The partitioned path (module section above): same marker identity and output as `DecontamFn`."""
    run = Path(fn.run_dir)
    stage_dir = rundir.stage_dir(run, "decontam")
    report, todo = runner.plan_stage(stage_dir, [unit], cfg_hash, checksums=rcfg.verify_checksums)
    if not todo:
        return report
    cal = calibration(run)
    if cal is None:
        raise RuntimeError(f"{run}/copydetect has no calibration: run copy detection before decontamination")
    work = stage_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    lists = tuple(p for p, _ in fn.proposers)
    copy_dir = str(rundir.vectors_dir(run, "copyembed")) if fn.copy_model else None
    job = PartJob(str(run), str(work), fn.cfg, lists, copy_dir, cal, fn.dedup_cfg)
    n, homes = _pool_index(job, rcfg, buckets)
    ev = ray.put(_eval_side(fn))  # the eval sets go into the object store once; every task reads them there
    matches: list[str] = []
    if n and homes:
        found = _map(rcfg, _candidates, job, homes, ev)
        merged = KNN_SCHEMA.empty_table()
        for path in found:  # one part's top k at a time: the driver holds O(eval images x k x lists)
            merged = _top_k(pa.concat_tables([merged, pq.read_table(path).cast(KNN_SCHEMA)]), fn.cfg.k)
        home_of = merged["home"].to_numpy()
        items = [(h, merged.filter(pa.array(home_of == h)).select(["q", "uid"])) for h in homes]
        matches = [p for p, _ in _map(rcfg, _decide, job, items, ev)]
    marker = _map(rcfg, _finish, job, [(matches, n, unit, str(stage_dir), cfg_hash)], ev)[0]
    shutil.rmtree(work, ignore_errors=True)
    return runner.collect(report, [marker], 1)


def _pool_index(job: PartJob, rcfg: runner.RunnerConfig, buckets: int | None) -> tuple[int, list[int]]:
    """Wave 0: the pool by home part; -> (pool size, home parts with members)."""
    run = Path(job.run_dir)
    manifests = dict(zip(sorted(rundir.ingest_markers(run)), rundir.ingest_manifests(run)))
    found = [(_FEAT_PART.match(p.name), p) for p in rundir.stage_dir(run, "copyfeat").glob("part-*.parquet")]
    feats = {int(m.group(1)): p for m, p in found if m}
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run).values())
    b = buckets or max(1, -(-records // RECORD_ROWS_PER_BUCKET))
    items = [(i, _str(manifests.get(i)), _str(feats.get(i))) for i in sorted(set(manifests) | set(feats))]
    _map(rcfg, _index_map, job, items, b)
    counts: dict[int, int] = {}
    for c in _map(rcfg, _index_reduce, job, list(range(b))):
        for h, k in c.items():
            counts[h] = counts.get(h, 0) + k
    return sum(counts.values()), sorted(counts)


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)
