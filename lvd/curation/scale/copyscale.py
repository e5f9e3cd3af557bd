"""Copy detection partitioned over Ray: no process holds the pool's uids, features, candidates or edges.

The same decisions as `stages.copy.CopyDetectFn` (one Ray task holding everything), reached by
waves of Ray tasks over Parquet files under a scratch folder. Images are numbered by their
position in `rundir.unique_accepted` (the single process's row order, so every tie breaks the
same way) and cut into ranges of `part_rows` positions (`r{r}`):

0. order: `scale.poolorder` numbers the unique accepted images by Ray tasks (node rows per
   range: uid, pixels, log aspect) and draws the calibration sample; a file's uids become
   positions by its bucketed joins (the copyfeat parts, the copy model's vector parts, the
   dedup groups), never by a uid list in the driver or a lookup sent to every task.
1. features: a task per `copyfeat` part sends its rows to their ranges; a task per range keeps
   the first row per image (as `read_features`), writes `feats/r{r}`, the model-free global
   descriptor as a float32 vector part (`glob/`) and the equalised hashes (`hashes/r{r}`), and
   sends its local-descriptor LSH keys (`copydetect.descriptor_candidates`' keys, one per key
   and image) to bucket hash(key).
2. pairs: a task per range j compares its equalised hashes with those of every range i <= j
   (block pairs, as `scale.hashdedup`: each pair of ranges is one task's) with the single
   process's exact search (`hamming_pairs.candidate_pairs`, R = the larger of `hash_radius` and
   the mirror radius): candidate pairs (within `hash_radius`, any of the four code / mirror
   code combinations, the smallest distance kept by the bound) and mirrored-hash pairs
   (already decided, as `copydetect.mirror_hash_pairs`). An LSH bucket gives pairs of images
   sharing a key; they are counted per pair in the range of its first image, kept from
   `min_shared` keys on, and ranked per image (most keys, then position).
3. kNN lists of the global descriptor, of every proposer folder and of the copy model's vectors
   (`RUN/copyvec`, with `--copy-model`) from `scale.shardindex` (sharded, canonical ties),
   written per range block by block.
4. hash groups: `scale.components` over the decided hash edges (the dedup stage's groups and the
   mirrored pairs): a label per image, written per range.
5. bound: a task per range applies `copydetect.bounded_candidates`' per-image rule to its own
   images (their hash candidates closest first, then their neighbours rank by rank, list by
   list, up to `max_verify`, partners of the image's own hash group skipped). The rule reads one
   image's own proposals only, so it gives the single process's pairs exactly.
6. verify: candidate pairs grouped by (range a, range b); a task loads the features of those
   two ranges' rows it needs and decides its pairs (`copydetect.verify_pairs`, calibrated
   threshold from `stages.copy.run_calibration`, unchanged). With a copy model its vectors
   (scattered from `RUN/copyvec`'s parts to the ranges of their images, `cvec/`) are loaded
   instead and the stage's `Decider` scores their cosine. Decided edges: `cedges/`.
7. components (`scale.components`) of decided + hash edges; edges go to component groups by
   label, and a task per group runs `split_chains`, `_edge_sets` and `dedup.resolve` on each of
   its components (a component's members, edges and features are small). `resolve` is local to
   a component, so the pieces are the single table's rows; one task sorts them by uid.

The mass-removal guard gets the same counts and largest groups as the single process.

Memory: a task holds one range's rows (or two ranges' hashes, or one bucket's keys, or one
pair group's features, or one component group, or `poolorder`'s one uid bucket or order range).
The driver holds O(ranges) (poolorder's key sample and counts, ranges x calibration images
keys) and one kNN query block at a time; a proposer's shards read the node files' uids a range
at a time (`poolorder.NodeUids`).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd.curation import copydetect as cd
from lvd.curation import rundir, runner
from lvd.curation.dedup import DUPLICATES_SCHEMA, resolve
from lvd.curation.guard import check_removal
from lvd.curation.hamming_pairs import candidate_pairs
from lvd.curation.localfeat import FEATURE_SCHEMA, Features, set_threads
from lvd.curation.scale import poolorder, shardindex
from lvd.curation.scale.components import ComponentsConfig, _read_dir, _write, components
from lvd.curation.scale.hashdedup import _mix
from lvd.curation.unionfind import UnionFind, representative_rank
from lvd.curation.vectors import UIDS_SCHEMA, part_paths

PARTITIONED_MIN_IMAGES = 1_000_000  # run_copydetect's automatic choice: unique accepted images
MIRROR_MAX_ASPECT = 1.1  # as CopyDetectFn._candidates
LSH = dict(n_desc=100, tables=4, bits=16, min_shared=4, max_bucket=64, seed=0)  # descriptor_candidates' defaults
_EDGE = pa.schema(
    [
        ("uid_a", pa.string()),
        ("uid_b", pa.string()),
        ("pixels_a", pa.int64()),
        ("pixels_b", pa.int64()),
        ("distance", pa.float64()),
    ]
)  # fmt: skip  (scale.components' input; uid = zero-padded position, so the smallest key is the smallest position)
_KNN = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("rank", pa.int64()), ("l", pa.int64())])
_PROP = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("d", pa.int64()), ("pa", pa.int64()), ("pb", pa.int64())])
_PAIR = pa.schema([("a", pa.int64()), ("b", pa.int64())])
_LDIR = pa.schema([("src", pa.int64()), ("dst", pa.int64()), ("cnt", pa.int64())])
_LABEL = pa.schema([("pos", pa.int64()), ("label", pa.int64())])
_GRP = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("phash", pa.bool_()), ("distance", pa.float64())])


@dataclass(frozen=True, kw_only=True)
class CopyScaleConfig:
    """Sizes of the partitioned copy detection."""

    part_rows: int = 50_000  # images per range: a range task holds this many images' features
    lsh_buckets: int = 16  # buckets of the local-descriptor LSH keys
    groups: int = 8  # component groups (split_chains tasks)
    partitions: int = 8  # node partitions of scale.components
    uid_buckets: int | None = None  # poolorder's uid buckets (None: from the ingest records)
    order_ranges: int | None = None  # poolorder's order ranges (None: from the ingest records)
    knn: shardindex.ShardConfig = field(default_factory=shardindex.ShardConfig)
    task_options: dict = field(default_factory=dict)  # Ray options of every task

    def __post_init__(self):
        for name in ("part_rows", "lsh_buckets", "groups", "partitions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use at least 1")


def chooses(run_dir: Path, partitioned: bool | None, copy_model=None, min_images: int | None = None) -> bool:
    """Whether run_copydetect takes this path: forced by `partitioned`, else from the pool size."""
    if partitioned is not None:
        return partitioned
    limit = PARTITIONED_MIN_IMAGES if min_images is None else min_images
    return sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values()) >= limit


@dataclass(frozen=True)
class StageParts:
    """What this path reuses from `stages.copy`, handed over by `run_copydetect` (the stage imports
    this module, not the reverse): pickled by reference, so each Ray task imports the stage's own."""

    calibrate: Callable  # run_calibration(run_dir, sample uids, cfg, copy_model) -> Calibration
    decider: Callable  # Decider(feats, copy_vecs, cal, cfg): scores, links, linked, distance
    edge_sets: Callable  # _edge_sets(split, phash, dist, decider, group) -> [EdgeSet]
    json_table: Callable  # _json_table(dict) -> one-row table


def run_partitioned(
    run_dir: Path,
    cfg: cd.CopyDetectConfig,
    unit: runner.WholeStage,
    *,
    parts: StageParts | None,
    proposers=(),
    copy_model=None,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    scale: CopyScaleConfig | None = None,
    mirror_radius: int = 20,
) -> runner.StageReport:
    """run_copydetect's partitioned path: the same outputs and marker as the single task
    (scratch under RUN/copydetect/scale, removed after); the guard refuses before writing."""
    stage_dir = rundir.stage_dir(run_dir, "copydetect")
    cfg_hash = runner.config_hash(cfg, copy_model)  # the single task's identity: same outputs
    report, todo = runner.plan_stage(stage_dir, [unit], cfg_hash, checksums=rcfg.verify_checksums)
    if not todo:
        return report
    scale = scale or CopyScaleConfig()
    opts = {"num_cpus": rcfg.num_cpus, "max_retries": rcfg.max_retries, **scale.task_options}
    scale = replace(scale, task_options=opts)
    work = stage_dir / "scale"
    shutil.rmtree(work, ignore_errors=True)
    got = partitioned_copydetect(
        run_dir, cfg, work, parts, scale, proposers=proposers, copy_model=copy_model, mirror_radius=mirror_radius
    )
    finish = ray.remote(_finish).options(**opts)
    marker = ray.get(finish.remote(got, cfg, unit, str(stage_dir), cfg_hash, parts))
    shutil.rmtree(work, ignore_errors=True)
    return runner.collect(report, [marker], 1)


def _finish(got: dict, cfg: cd.CopyDetectConfig, unit, stage_dir: str, cfg_hash: str, parts: StageParts) -> dict:
    """The guard, then the single task's three outputs and its marker."""
    table = pq.read_table(got["duplicates"])
    cal = cd.Calibration.from_dict(got["calibration"])
    check_removal(
        "copy detection", table.num_rows, got["images"], cfg.max_remove, largest=got["largest"],
        detail=cal.summary() + ". ",
    )  # fmt: skip
    outputs = {"": table, "calibration": parts.json_table(cal.as_dict()), "stats": parts.json_table(got["stats"])}
    return runner.write_outputs(outputs, unit, stage_dir, cfg_hash)


# ---------------------------------------------------------------- the driver


def partitioned_copydetect(
    run_dir: Path,
    cfg: cd.CopyDetectConfig,
    work_dir: Path,
    parts: StageParts,
    scale: CopyScaleConfig = CopyScaleConfig(),
    *,
    proposers=(),
    copy_model: tuple[str, dict] | None = None,
    mirror_radius: int = 20,
) -> dict:
    """All steps of the module doc; returns paths and counts (the table: `duplicates`). Needs Ray."""
    t0 = time.perf_counter()
    run, work = Path(run_dir), Path(work_dir)
    opts = {"num_cpus": 1, "max_retries": 3, **scale.task_options}
    S = scale.part_rows
    sizes = dict(buckets=scale.uid_buckets, ranges=scale.order_ranges)
    order = poolorder.number(run, work, S, opts, calib=(cfg.calib_images, cfg.seed), **sizes)
    # the calibration (its own Ray tasks, as in the single task) runs in a task of its own
    # while the candidates are found: it decodes images, which the driver should not hold
    cal_job = ray.remote(_calibrate).options(**opts).remote(str(run), order.sample, cfg, parts, copy_model)
    n, uids = order.n, order.uids
    ranges = [(r, r * S, min(n, (r + 1) * S)) for r in range(-(-n // S))]
    files = sorted(rundir.stage_dir(run, "copyfeat").glob("part-*.parquet"))
    poolorder.join(order, "feat", [(str(f), ["uid"], None) for f in files], opts)
    _wave(_feat_scatter, [(str(f), c, S, str(work)) for c, f in enumerate(files)], opts)
    _wave(_feat_gather, [(str(work), r, lo, hi, scale.lsh_buckets) for r, lo, hi in ranges], opts)
    copy_vecs = rundir.vectors_dir(run, "copyembed") if copy_model is not None else None
    if copy_vecs is not None:  # the copy model's vectors to the ranges of their images, one per image
        vparts = shardindex.list_parts(copy_vecs)
        uid_files = [(str(part_paths(copy_vecs, i)[1]), ["uid"], None) for i, _ in vparts]
        poolorder.join(order, "cvec", uid_files, opts)
        _wave(_vec_scatter, [(str(copy_vecs), i, c, S, str(work)) for c, (i, _) in enumerate(vparts)], opts)
        _wave(_vec_gather, [(str(work), r, lo, hi) for r, lo, hi in ranges], opts)
    t_read = time.perf_counter()
    rad = dict(R=max(cfg.hash_radius, mirror_radius), hash=cfg.hash_radius, mirror=mirror_radius, S=S)
    _wave(_hash_pairs, [(str(work), r, rad) for r, _, _ in ranges], opts)
    _wave(_lsh_reduce, [(str(work), b, S) for b in range(scale.lsh_buckets)], opts)
    _wave(_lsh_count, [(str(work), r, S) for r, _, _ in ranges], opts)
    mirrors = sum(_wave(_mirror_unique, [(str(work), r) for r, _, _ in ranges], opts))
    dedup_rows = _dedup_edges(run, work, order, opts)
    comp = replace(ComponentsConfig(), partitions=scale.partitions, task_options=scale.task_options)
    _labels(sorted((work / "hedges").glob("*.parquet")), work / "hcomp", work / "hlabel", S, comp, opts)
    _knn(work / "glob", uids, cfg.k, 1, work, S, scale.knn)
    for li, d in enumerate(proposers):
        _knn(Path(d), uids, cfg.k, 2 + li, work, S, scale.knn)
    if copy_vecs is not None:  # the copy model proposes too, after the embedders (as the single task)
        _knn(copy_vecs, uids, cfg.k, 2 + len(proposers), work, S, scale.knn)
    bound = _wave(_bound, [(str(work), r, lo, hi, cfg.k, cfg.max_verify, S) for r, lo, hi in ranges], opts)
    t_cand = time.perf_counter()
    cal, seconds_cal = ray.get(cal_job)
    t_cal = time.perf_counter()
    groups = sorted(p.name for p in (work / "cand").iterdir()) if (work / "cand").exists() else []
    model = copy_vecs is not None
    decided = _wave(_verify, [(str(work), g, cfg, cal.as_dict(), S, parts, model) for g in groups], opts)
    t_verify = time.perf_counter()
    edge_files = sorted((work / "cedges").glob("*.parquet")) + sorted((work / "hedges").glob("*.parquet"))
    _labels(edge_files, work / "ccomp", work / "clabel", S, comp, opts)
    _wave(_to_groups, [(str(f), str(work), S, scale.groups) for f in edge_files], opts)
    split = _wave(_split, [(str(work), g, cfg, cal.as_dict(), S, parts, model) for g in range(scale.groups)], opts)
    out = work / "duplicates.parquet"
    ray.get(ray.remote(_assemble).options(**opts).remote(str(work / "pieces"), str(out)))
    t_split = time.perf_counter()
    rows = sum(s["rows"] for s in split)
    largest = sorted([g for s in split for g in s["largest"]], key=lambda g: (-g[0], g[1]))[:4]
    stats = dict(
        images=n,
        candidates=sum(c for c, _ in decided),
        hash_candidates=sum(b["hash_candidates"] for b in bound),
        decided_links=sum(k for _, k in decided),
        phash_links=dedup_rows + mirrors,
        components_split=sum(s["components_split"] for s in split),
        split_checks=sum(s["split_checks"] for s in split),
        unresolved=sum(s["unresolved"] for s in split),
        duplicates=rows,
        method=cal.method,
        seconds_read=t_read - t0,
        seconds_calibrate=seconds_cal,
        seconds_calibrate_wait=t_cal - t_cand,
        seconds_candidates=t_cand - t_read,
        seconds_verify=t_verify - t_cal,
        seconds_split=t_split - t_verify,
        partitioned=True,
    )
    return dict(duplicates=str(out), images=n, stats=stats, calibration=cal.as_dict(), largest=[g[2] for g in largest])


def _calibrate(run: str, sample: list[str], cfg: cd.CopyDetectConfig, parts: StageParts, copy_model=None) -> tuple:
    """stages.copy.run_calibration on the sample `poolorder.number` drew, and its seconds."""
    t = time.perf_counter()
    return parts.calibrate(Path(run), sample, cfg, copy_model), time.perf_counter() - t


def _wave(fn, args: list[tuple], opts: dict) -> list:
    remote = ray.remote(fn).options(**opts)
    return ray.get([remote.remote(*a) for a in args])


def _pid(pos) -> pa.Array:
    """Node ids for scale.components: zero-padded positions (string order = position order)."""
    return pc.utf8_lpad(pc.cast(pa.array(np.asarray(pos, np.int64)), pa.string()), 13, "0")


def _range_dir(work: Path, what: str, r: int) -> Path:
    return Path(work) / what / f"r{r}"


def _scatter(table: pa.Table, part: np.ndarray, folder: Path, name: str, prefix: str = "r") -> None:
    for r in np.unique(part):
        _write(table.take(np.flatnonzero(part == r)), folder / f"{prefix}{r}" / f"{name}.parquet")


def _read_ranges(work: Path, what: str, pos: np.ndarray, S: int, columns=None) -> pa.Table | None:
    """Rows of `what/r{r}.parquet` (or `what/r{r}/*.parquet`) for the positions asked for,
    reading only the ranges they fall in."""
    parts = []
    for r in np.unique(np.asarray(pos, np.int64) // S):
        path = Path(work) / what / f"r{r}.parquet"
        files = [path] if path.exists() else sorted((Path(work) / what / f"r{r}").glob("*.parquet"))
        for f in files:
            t = pq.read_table(f, columns=columns)
            parts.append(t.filter(pc.is_in(t["pos"], pa.array(np.asarray(pos, np.int64)))))
    return pa.concat_tables(parts) if parts else None


def _labels_of(work: Path, what: str, pos: np.ndarray, S: int) -> np.ndarray:
    """Label of each position (its component's smallest position; itself when alone)."""
    pos = np.asarray(pos, np.int64)
    out = pos.copy()
    t = _read_ranges(work, what, np.unique(pos), S)
    if t is not None and t.num_rows:
        p, lab = t["pos"].to_numpy(), t["label"].to_numpy()
        order = np.argsort(p)
        i = np.minimum(np.searchsorted(p[order], pos), len(p) - 1)
        hit = p[order][i] == pos
        out[hit] = lab[order][i][hit]
    return out


# ---------------------------------------------------------------- features and keys


def _scatter_tagged(t: pa.Table, pos: np.ndarray, c: int, S: int, folder: Path) -> None:
    """Rows of source part c to the ranges of their positions (-1: not a unique accepted
    image, dropped), tagged with (part, row) so `_first_rows` keeps one row per image."""
    t = t.append_column("pos", pa.array(pos)).append_column("_c", pa.array(np.full(len(pos), c, np.int64)))
    t = t.append_column("_row", pa.array(np.arange(len(pos), dtype=np.int64)))
    keep = np.flatnonzero(pos >= 0)
    _scatter(t.take(keep), pos[keep] // S, folder, f"c{c}")


def _first_rows(t: pa.Table) -> pa.Table:
    """One row per position, the first by (part, row), sorted by position (tags dropped)."""
    if t.num_rows:
        t = t.sort_by([("pos", "ascending"), ("_c", "ascending"), ("_row", "ascending")])
        pos = t["pos"].to_numpy()
        t = t.filter(pa.array(np.r_[True, pos[1:] != pos[:-1]]))
    return t.drop_columns(["_c", "_row"])


def _check_range(work: str, r: int, got: pa.Table, lo: int, hi: int, what: str, why: str) -> None:
    """Every image of range r has its row in `got` (pos column), else name the first missing one."""
    if got.num_rows == hi - lo:
        return
    nodes = poolorder.nodes(work, r)
    have = set(got["pos"].to_pylist())
    missing = [u for p_, u in zip(nodes["pos"].to_pylist(), nodes["uid"].to_pylist()) if p_ not in have]
    raise RuntimeError(f"{what} for {len(missing)} accepted images (first {missing[0]}): {why}")


def _feat_scatter(path: str, c: int, S: int, work: str) -> None:
    t = pq.read_table(path)
    _scatter_tagged(t, poolorder.positions(work, "feat", c, t.num_rows)[0], c, S, Path(work) / "featscat")


def _feat_gather(work: str, r: int, lo: int, hi: int, L: int) -> None:
    """Range r's features (first row per image, as read_features), its glob vector part, its
    equalised hashes, and its LSH keys to their buckets."""
    set_threads(1)
    t = _read_dir(_range_dir(work, "featscat", r), FEATURE_SCHEMA)
    t = _first_rows(t) if t.num_rows else t.append_column("pos", pa.array(np.zeros(0, np.int64)))
    _check_range(work, r, t, lo, hi, "copyfeat has no features", "the copyfeat stage did not finish")
    t = t.drop_columns(["pos"])
    pos = np.arange(lo, hi, dtype=np.int64)
    _write(t.append_column("pos", pa.array(pos)), Path(work) / "feats" / f"r{r}.parquet")
    n = t.num_rows
    glob = (
        np.stack([np.frombuffer(g, np.float32) for g in t["glob"].to_pylist()]) if n else np.zeros((0, 144), np.float32)
    )
    _glob_part(Path(work) / "glob", r, t["uid"], glob)
    la = poolorder.nodes(work, r)["log_aspect"]
    hashes = t.select(["nhash", "nhash_flip"]).append_column("pos", pa.array(pos)).append_column("log_aspect", la)
    _write(hashes, Path(work) / "hashes" / f"r{r}.parquet")
    _lsh_keys(work, r, pos, _feature_list(t), L)


def _feature_list(t: pa.Table) -> list[Features]:
    return [
        Features.from_row(x) for x in t.select(["kp", "desc", "kp_flip", "desc_flip", "fw", "fh", "up"]).to_pylist()
    ]


def _glob_part(folder: Path, r: int, uids: pa.ChunkedArray, glob: np.ndarray) -> None:
    """One float32 vector part in the `vectors` layout (ids = positions: parts in range order)."""
    npy, uid_file = part_paths(folder, r)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(npy, np.ascontiguousarray(glob, np.float32), allow_pickle=False)
    pq.write_table(pa.table({"uid": uids}, schema=UIDS_SCHEMA), uid_file)


def _lsh_keys(work, r, pos, feats: list[Features], L) -> None:
    """descriptor_candidates' keys, one per (key, image), to bucket hash(key) mod L."""
    tables, bits = LSH["tables"], LSH["bits"]
    sel = np.random.default_rng(LSH["seed"]).permutation(8 * 32)[: tables * bits].reshape(tables, bits)
    descs = [d[: LSH["n_desc"]] for f in feats for d in (f.desc, f.desc_flip)]
    owners = np.repeat(np.asarray(pos, np.int64).repeat(2), [len(d) for d in descs])
    if not len(owners):
        return
    keys = cd.lsh_keys(np.concatenate(descs), sel)
    ko = cd.sorted_unique((keys.astype(np.int64) << 40) | owners[:, None])
    key, owner = ko >> 40, ko & ((1 << 40) - 1)
    table = pa.table({"key": key, "owner": owner})
    _scatter(table, (_mix(key.astype(np.uint64)) % np.uint64(L)).astype(np.int64), Path(work) / "lbuck", f"r{r}", "b")


# ---------------------------------------------------------------- buckets


def _hash_pairs(work: str, j: int, rad: dict) -> None:
    """Equalised-hash code pairs between range j and each range i <= j within R bits (block
    pairs, as scale.hashdedup: every pair of ranges is one task's; the exact pigeonhole search
    `hamming_pairs.candidate_pairs` of the single process on the two ranges' codes): hash
    candidates (both ways, to each image's range; all four combinations of code and mirror
    code, the bound keeps the smallest distance) and mirrored pairs (one image's code against
    the other's mirror code, aspect ratios within MIRROR_MAX_ASPECT), as
    copydetect.hash_candidates and mirror_hash_pairs."""
    mine = pq.read_table(Path(work) / "hashes" / f"r{j}.parquet")
    found = []
    for i in range(j + 1):
        both = mine if i == j else pa.concat_tables([pq.read_table(Path(work) / "hashes" / f"r{i}.parquet"), mine])
        n, cut = both.num_rows, both.num_rows - mine.num_rows  # rows >= cut: range j
        codes = _codes(both)  # image x's code at row x, its mirror code at row n + x
        a, b = candidate_pairs(codes, rad["R"])
        xa, xb = a % n, b % n
        keep = (xa != xb) & ((xa >= cut) != (xb >= cut) if i != j else True)
        a, b, xa, xb = a[keep], b[keep], xa[keep], xb[keep]
        d = np.bitwise_count(codes[a] ^ codes[b]).sum(axis=1).astype(np.int64)
        pos, la = both["pos"].to_numpy(), both["log_aspect"].to_numpy()
        aspect_ok = np.abs(la[xa] - la[xb]) <= math.log(MIRROR_MAX_ASPECT) + 1e-12
        cross = (a < n) != (b < n)
        found.append((np.minimum(pos[xa], pos[xb]), np.maximum(pos[xa], pos[xb]), d, cross, aspect_ok))
    lo, hi, d, cross, aspect_ok = (np.concatenate(x) for x in zip(*found))
    S = rad["S"]
    hit = d <= rad["hash"]
    i = np.concatenate([lo[hit], hi[hit]])
    props = pa.table({"i": i, "j": np.concatenate([hi[hit], lo[hit]]), "d": np.tile(d[hit], 2),
                      "pa": np.tile(lo[hit], 2), "pb": np.tile(hi[hit], 2)}, schema=_PROP)  # fmt: skip
    _scatter(props, i // S, Path(work) / "prop", f"h{j}")
    m = cross & (d <= rad["mirror"]) & aspect_ok
    _scatter(pa.table({"a": lo[m], "b": hi[m]}, schema=_PAIR), lo[m] // S, Path(work) / "mirror", f"h{j}")


def _codes(t: pa.Table) -> np.ndarray:
    """uint64 [2n, 4]: each image's equalised pHash, then each one's mirror pHash."""
    n = t.num_rows
    raw = [np.frombuffer(b"".join(t[c].to_pylist()), np.uint8).reshape(n, 32) for c in ("nhash", "nhash_flip")]
    return np.ascontiguousarray(np.concatenate(raw)).view(np.uint64)


def _mirror_unique(work: str, r: int) -> int:
    """Range r's mirrored pairs once each, as hash edges; returns their number."""
    t = _read_dir(_range_dir(work, "mirror", r), _PAIR)
    if not t.num_rows:
        return 0
    t = t.group_by(["a", "b"]).aggregate([])
    _write(
        _edges(t["a"].to_numpy(), t["b"].to_numpy(), np.zeros(t.num_rows)),
        Path(work) / "hedges" / f"mirror-r{r}.parquet",
    )
    return t.num_rows


def _edges(a, b, distance) -> pa.Table:
    zeros = np.zeros(len(a), np.int64)
    return pa.table({"uid_a": _pid(a), "uid_b": _pid(b), "pixels_a": zeros, "pixels_b": zeros,
                     "distance": np.asarray(distance, np.float64)}, schema=_EDGE)  # fmt: skip


def _lsh_reduce(work: str, b: int, S: int) -> None:
    """Pairs of images sharing a key of bucket b (keys held by 2..max_bucket images), one
    occurrence per key, to the range of the pair's first image."""
    t = _read_dir(Path(work) / "lbuck" / f"b{b}", pa.schema([("key", pa.int64()), ("owner", pa.int64())]))
    if not t.num_rows:
        return
    t = t.sort_by([("key", "ascending"), ("owner", "ascending")])
    keys, owners = t["key"].to_numpy(), t["owner"].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    pa_, pb_ = [], []
    for size in np.unique(sizes):
        if size < 2 or size > LSH["max_bucket"]:
            continue
        members = owners[starts[sizes == size][:, None] + np.arange(size)]
        ii, jj = np.triu_indices(size, 1)
        pa_.append(members[:, ii].ravel()), pb_.append(members[:, jj].ravel())
    if pa_:
        a, c = np.concatenate(pa_), np.concatenate(pb_)
        a, c = np.minimum(a, c), np.maximum(a, c)
        _scatter(pa.table({"a": a, "b": c}, schema=_PAIR), a // S, Path(work) / "lpair", f"b{b}")


def _lsh_count(work: str, r: int, S: int) -> None:
    """Range r's pairs counted over all keys, kept from min_shared keys, both ways to the
    range of the image whose list they join."""
    t = _read_dir(_range_dir(work, "lpair", r), _PAIR)
    if not t.num_rows:
        return
    c = t.group_by(["a", "b"]).aggregate([("a", "count")])
    c = c.filter(pc.greater_equal(c["a_count"], LSH["min_shared"]))
    a, b, cnt = c["a"].to_numpy(), c["b"].to_numpy(), c["a_count"].to_numpy().astype(np.int64)
    src = np.concatenate([a, b])
    out = pa.table({"src": src, "dst": np.concatenate([b, a]), "cnt": np.tile(cnt, 2)}, schema=_LDIR)
    _scatter(out, src // S, Path(work) / "ldir", f"s{r}")


def _dedup_edges(run: Path, work: Path, order: poolorder.PoolOrder, opts) -> int:
    """The hash dedup stage's groups as hash edges (member, representative), a task per row group."""
    path = rundir.stage_dir(run, "dedup") / "duplicates.parquet"
    if not path.exists():
        return 0
    groups = pq.ParquetFile(path).num_row_groups
    poolorder.join(order, "dedup", [(str(path), ["uid", "duplicate_of"], g) for g in range(groups)], opts)
    return sum(_wave(_dedup_part, [(str(path), g, str(work)) for g in range(groups)], opts))


def _dedup_part(path: str, g: int, work: str) -> int:
    n = pq.ParquetFile(path).metadata.row_group(g).num_rows
    a, b = poolorder.positions(work, "dedup", g, n, 2)
    if (a < 0).any() or (b < 0).any():
        raise KeyError(f"{path}: the hash dedup groups name images that are not unique accepted ones")
    _write(_edges(a, b, np.zeros(len(a))), Path(work) / "hedges" / f"dedup-{g}.parquet")
    return len(a)


def _labels(edge_files: list[Path], comp_dir: Path, out: Path, S: int, comp: ComponentsConfig, opts) -> None:
    """Component labels (smallest position) of the edges' nodes, written per range to `out`."""
    got = components(edge_files, comp_dir, comp)
    _wave(_label_part, [(str(p), str(out), S) for p in got.outputs], opts)


def _label_part(path: str, out: str, S: int) -> None:
    t = pq.read_table(path)
    pos = pc.cast(t["uid"], pa.int64()).to_numpy()
    lab = pc.cast(t["duplicate_of"], pa.int64()).to_numpy()
    _scatter(pa.table({"pos": pos, "label": lab}, schema=_LABEL), pos // S, Path(out), Path(path).stem)


def _knn(folder: Path, uids, k: int, li: int, work: Path, S: int, cfg: shardindex.ShardConfig) -> None:
    """Neighbour lists (ids = positions in `uids`, a `poolorder.NodeUids`) of a vector folder,
    written per range: one in-process index below `cfg.sharded_above` images
    (shardindex.knn_lists; the list read, as small as that), else the sharded index walked one
    query block at a time. Our own descriptor parts (li 1) hold one row per position in order,
    so their store rows are the positions; another folder's shards each map their own parts'
    uids against the node files, a position range at a time."""
    if not len(uids):
        return
    if len(uids) < cfg.sharded_above:
        if li == 1:  # our own float32 parts (a vector store holds float16): copydetect.knn_lists on them
            parts = sorted(folder.glob("part-*.npy"))
            ids = cd.knn_lists(np.concatenate([np.load(p) for p in parts]), k)
        else:
            ids = shardindex.knn_lists(folder, list(uids), k, cfg=cfg)
        _knn_rows(np.arange(len(uids)), ids, li, work, S, "all")
        return
    with shardindex.build(folder, None if li == 1 else uids, cfg) as index:
        for x, (ids, nb) in enumerate(index.self_neighbours(k)):
            _knn_rows(ids, nb, li, work, S, str(x))


def _knn_rows(ids: np.ndarray, nb: np.ndarray, li: int, work: Path, S: int, name: str) -> None:
    rank = np.broadcast_to(np.arange(nb.shape[1]), nb.shape)
    i = np.broadcast_to(ids[:, None], nb.shape)
    keep = nb >= 0
    t = pa.table({"i": i[keep], "j": nb[keep], "rank": rank[keep], "l": np.full(int(keep.sum()), li)}, schema=_KNN)
    _scatter(t, i[keep] // S, work / "knn", f"l{li}-{name}")


# ---------------------------------------------------------------- the per-image bound


def bound_rows(hash_rows: pd.DataFrame, knn_rows: pd.DataFrame, max_verify: int) -> tuple[np.ndarray, np.ndarray]:
    """copydetect.bounded_candidates for the images of `hash_rows.i` / `knn_rows.i`, from their
    own proposals: hash rows (i, j, d, pa, pb; one per pair and image, smallest d) and kNN rows
    (i, j, rank, l), partners of i's own hash group already left out (a skipped partner takes
    no room). Each image keeps its hash partners by (d, pa, pb), then its neighbours by (rank,
    list) not yet kept, up to max_verify: the sequential rule, since an image's list only ever
    grows by its own proposals. Returns pairs (a < b), unique."""
    h = hash_rows.sort_values(["i", "d", "pa", "pb"], kind="stable")
    h = h[h.groupby("i").cumcount().to_numpy() < max_verify]
    kn = knn_rows[knn_rows["j"].to_numpy() >= 0]
    kn = kn.sort_values(["i", "rank", "l"], kind="stable").drop_duplicates(["i", "j"], keep="first")
    taken = pd.MultiIndex.from_frame(h[["i", "j"]])
    kn = kn[~pd.MultiIndex.from_frame(kn[["i", "j"]]).isin(taken)]
    room = max_verify - h.groupby("i").size().reindex(kn["i"].to_numpy(), fill_value=0).to_numpy()
    kn = kn[kn.groupby("i").cumcount().to_numpy() < room]
    i = np.concatenate([h["i"].to_numpy(), kn["i"].to_numpy()]).astype(np.int64)
    j = np.concatenate([h["j"].to_numpy(), kn["j"].to_numpy()]).astype(np.int64)
    a, b = np.minimum(i, j), np.maximum(i, j)
    ok = a != b
    pairs = np.unique(np.stack([a[ok], b[ok]], axis=1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
    return pairs[:, 0], pairs[:, 1]


def _bound(work: str, r: int, lo: int, hi: int, k: int, max_verify: int, S: int) -> dict:
    """Range r's images' candidates (bound_rows), to verify groups by (range a, range b)."""
    hp = _read_dir(_range_dir(work, "prop", r), _PROP).to_pandas()
    hp = hp.groupby(["i", "j"], as_index=False).agg(d=("d", "min"), pa=("pa", "first"), pb=("pb", "first"))
    hash_candidates = int((hp["i"] == hp["pa"]).sum())
    ld = _read_dir(_range_dir(work, "ldir", r), _LDIR).to_pandas()
    ld = ld.sort_values(["src", "cnt", "dst"], ascending=[True, False, True], kind="stable")
    ld = ld.assign(rank=ld.groupby("src").cumcount().to_numpy())
    ld = ld[ld["rank"] < k]
    desc = pd.DataFrame({"i": ld["src"].to_numpy(), "j": ld["dst"].to_numpy(), "rank": ld["rank"].to_numpy(), "l": 0})
    knn = pd.concat([desc, _read_dir(_range_dir(work, "knn", r), _KNN).to_pandas()], ignore_index=True)
    hp, knn = _other_groups(work, hp, S), _other_groups(work, knn, S)
    a, b = bound_rows(hp, knn, max_verify)
    t = pa.table({"a": a, "b": b}, schema=_PAIR)
    _scatter(t, (a // S) * (1 << 20) + b // S, Path(work) / "cand", f"s{r}", "g")
    return {"hash_candidates": hash_candidates, "pairs": len(a)}


def _other_groups(work: str, rows: pd.DataFrame, S: int) -> pd.DataFrame:
    """Rows whose partner j is not in image i's hash group."""
    i, j = rows["i"].to_numpy(np.int64), rows["j"].to_numpy(np.int64)
    lab = _labels_of(Path(work), "hlabel", np.concatenate([i, np.maximum(j, 0)]), S)
    return rows[(lab[: len(i)] != lab[len(i) :]) | (j < 0)]


# ---------------------------------------------------------------- deciding, components, splitting


def _vec_scatter(folder: str, index: int, c: int, S: int, work: str) -> None:
    """A copy-model vector part's rows to the ranges of their images (`cvec/`): position, part
    order and row (the store's first row of a uid wins, as `VectorStore.get`), float16 bytes."""
    npy = part_paths(folder, index)[0]
    vecs = np.ascontiguousarray(np.load(npy, allow_pickle=False), np.float16)
    col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(max(1, 2 * vecs.shape[1])), len(vecs), [None, pa.py_buffer(vecs)]
    )
    pos = poolorder.positions(work, "cvec", c, len(vecs))[0]
    _scatter_tagged(pa.table({"vec": col}), pos, c, S, Path(work) / "cvec")


def _vec_gather(work: str, r: int, lo: int, hi: int) -> None:
    """Range r's copy-model vectors, one per image (`_first_rows`), sorted: `cvecs/r{r}`."""
    d = _range_dir(work, "cvec", r)
    files = sorted(d.glob("*.parquet")) if d.exists() else []
    t = (
        _first_rows(pa.concat_tables([pq.read_table(f) for f in files]))
        if files
        else pa.table({"pos": pa.array([], pa.int64())})
    )
    _check_range(work, r, t, lo, hi, "copyvec has no vectors", "the copy-embed stage did not finish")
    _write(t, Path(work) / "cvecs" / f"r{r}.parquet")


def _copy_vectors(work: str, pos: np.ndarray, S: int) -> np.ndarray:
    """float16 [len(pos), D]: the copy model's vectors of the given positions (sorted)."""
    if not len(pos):
        return np.zeros((0, 0), np.float16)
    t = _read_ranges(Path(work), "cvecs", pos, S).sort_by("pos")
    return np.frombuffer(b"".join(t["vec"].to_pylist()), np.float16).reshape(len(pos), -1)


def _features(work: str, pos: np.ndarray, S: int) -> list[Features]:
    """Features of the given positions (sorted), read from the ranges they fall in."""
    t = _read_ranges(Path(work), "feats", pos, S).sort_by("pos")
    if t.num_rows != len(pos):
        raise RuntimeError(f"{work}: features of {len(pos) - t.num_rows} positions missing")
    return _feature_list(t)


def _verify(
    work: str, group: str, cfg: cd.CopyDetectConfig, cal: dict, S: int, parts: StageParts, model: bool = False
) -> tuple[int, int]:
    """One (range a, range b) group's candidate pairs decided on the features (or the copy
    model's vectors) of the rows they touch; decided edges (the decider's distance: 1 / (1 +
    inliers), or 1 - cosine) to cedges/. Returns (pairs, links)."""
    set_threads(1)
    cal_ = cd.Calibration.from_dict(cal)
    t = (
        _read_dir(Path(work) / "cand" / group, _PAIR)
        .group_by(["a", "b"])
        .aggregate([])
        .sort_by([("a", "ascending"), ("b", "ascending")])
    )
    a, b = t["a"].to_numpy(), t["b"].to_numpy()
    need = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(need, a), np.searchsorted(need, b)
    if model:  # a cosine per pair (the Decider's own; no nested Ray fan-out either way)
        decider = parts.decider([], _copy_vectors(work, need, S), cal_, cfg)
        scores = decider.scores(ia, ib)
    else:
        decider = parts.decider(_features(work, need, S), None, cal_, cfg)
        scores = cd.verify_pairs(decider.feats, ia, ib, cfg.verify, int(np.ceil(cal_.threshold))).astype(np.float64)
    keep = decider.links(scores)
    _write(_edges(a[keep], b[keep], decider.distance(scores[keep])), Path(work) / "cedges" / f"{group}.parquet")
    return len(a), int(keep.sum())


def _to_groups(path: str, work: str, S: int, G: int) -> None:
    """An edge file's edges to the component group of their label (phash: a hash edge)."""
    e = pq.read_table(path)
    a = pc.cast(e["uid_a"], pa.int64()).to_numpy()
    b = pc.cast(e["uid_b"], pa.int64()).to_numpy()
    lab = _labels_of(Path(work), "clabel", a, S)
    t = pa.table({"a": a, "b": b, "phash": np.full(len(a), Path(path).parent.name == "hedges"),
                  "distance": e["distance"].to_numpy()}, schema=_GRP)  # fmt: skip
    _scatter(t, (_mix(lab.astype(np.uint64)) % np.uint64(G)).astype(np.int64), Path(work) / "grp", Path(path).stem, "g")


def _split(
    work: str, g: int, cfg: cd.CopyDetectConfig, cal: dict, S: int, parts: StageParts, model: bool = False
) -> dict:
    """Group g's components: split_chains, the star edges' methods and distances, resolve;
    each component is whole here, so these are the single process's rows."""
    set_threads(1)
    none = dict(rows=0, components_split=0, split_checks=0, unresolved=0, largest=[])
    e = _read_dir(Path(work) / "grp" / f"g{g}", _GRP)
    if not e.num_rows:
        return none
    a, b, ph = e["a"].to_numpy(), e["b"].to_numpy(), e["phash"].to_numpy(zero_copy_only=False)
    members = np.unique(np.concatenate([a, b]))
    nodes = _read_ranges(Path(work), "nodes", members, S).sort_by("pos")
    uids = np.asarray(nodes["uid"].to_pylist(), dtype=object)
    pixels = nodes["pixels"].to_numpy()
    group = _labels_of(Path(work), "hlabel", members, S)
    cal_ = cd.Calibration.from_dict(cal)
    if model:
        decider = parts.decider([], _copy_vectors(work, members, S), cal_, cfg)
    else:
        decider = parts.decider(_features(work, members, S), None, cal_, cfg)
    la, lb = np.searchsorted(members, a), np.searchsorted(members, b)
    copy = ~ph
    ea, eb = np.concatenate([la[copy], la[ph]]), np.concatenate([lb[copy], lb[ph]])
    rank = representative_rank(pixels, uids)
    split = cd.split_chains(len(members), ea, eb, rank, decider.linked, cfg.max_centres, group=group)
    ca, cb = np.minimum(la[copy], lb[copy]), np.maximum(la[copy], lb[copy])
    dist = dict(zip(zip(ca.tolist(), cb.tolist()), e["distance"].to_numpy()[copy].tolist()))
    phash = set(zip(np.minimum(la[ph], lb[ph]).tolist(), np.maximum(la[ph], lb[ph]).tolist()))
    table = resolve(uids, pixels, parts.edge_sets(split, phash, dist, decider, group))
    _write(table, Path(work) / "pieces" / f"g{g}.parquet")
    return dict(
        rows=table.num_rows,
        components_split=split.components_split,
        split_checks=split.extra_checks,
        unresolved=split.unresolved,
        largest=_largest(members, uids, split.edges_a, split.edges_b),
    )


def _largest(members, uids, a, b, top: int = 4, per: int = 8) -> list:
    """copydetect.largest_groups' candidates of this group: (size, first position, uids)."""
    uf = UnionFind(len(members))
    uf.union_edges(np.asarray(a, np.int64), np.asarray(b, np.int64))
    roots = uf.roots()
    found: dict[int, list[int]] = {}
    for i in sorted(set(np.concatenate([a, b]).tolist())):
        found.setdefault(int(roots[i]), []).append(i)
    big = sorted(found.values(), key=lambda m: (-len(m), m[0]))[:top]
    return [(len(m), int(members[m[0]]), [str(uids[i]) for i in m[:per]]) for m in big]


def _assemble(pieces: str, out: str) -> None:
    files = sorted(Path(pieces).glob("*.parquet")) if Path(pieces).exists() else []
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else DUPLICATES_SCHEMA.empty_table()
    _write(t.sort_by([("uid", "ascending")]), Path(out))
