"""Copy detection and decontamination as runner work (`lvd.curation.copydetect` decides).

Layout inside a run folder R (the pool, or a seed / eval-set run under RUN/seeds/<name>,
RUN/eval/<name>):
- `R/copyfeat/part-NNNNNN.parquet` (`localfeat.FEATURE_SCHEMA`): local features, the
  model-free global descriptor and the equalised hashes of every accepted blob of ingest
  partition NNNNNN (one Ray task per partition);
- `R/copyvec/` + `R/copyembed/`: copy-model descriptors (vector store + markers), only with
  `--copy-model`;
- `R/copydetect/duplicates.parquet` (`dedup.DUPLICATES_SCHEMA`): the hash dedup groups and the
  decided copy edges, split into stars (`method` = `phash`, `copy` or `copy-model`;
  `distance` = 1 / (1 + inliers) for `copy`, 1 - cosine for `copy-model`); it supersedes
  `R/dedup/duplicates.parquet` in the ledger. Beside it `duplicates.calibration.parquet` (one
  row: the calibration as JSON) and `duplicates.stats.parquet` (candidate and decision counts);
- `R/decontam/decontaminated.parquet`: see `stages.decontam`.
Copy detection is one `runner.WholeStage`, keyed by the markers of what it reads; its
decision work (pair verification) fans out over Ray tasks (`fanout.parallel_map`).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd import durable
from lvd.curation import copydetect as cd
from lvd.curation import fanout, rundir, runner, uidbuckets
from lvd.curation.dedup import DUPLICATES_SCHEMA, EdgeSet, resolve
from lvd.curation.guard import check_removal
from lvd.curation.localfeat import (
    DESC_BYTES,
    FEATURE_SCHEMA,
    FEATURES_VERSION,
    FeatureConfig,
    Features,
    features_row,
    local_features,
    set_threads,
)
from lvd.curation.scale import shardindex
from lvd.curation.unionfind import representative_rank
from lvd.curation.vectors import open_vectors

VERIFY_BATCH = 1024  # pairs per Ray verification task


# ---------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatUnit:
    """One ingest partition's blobs file (as `stages_embed.EmbedUnit`, but defined here: a
    Ray worker unpickling this imports no torch, which took seconds of CPU per worker), and
    the uids whose features an earlier partition already finds (exact duplicates: the same
    bytes, the same features; 8% of the benchmark dump's accepted blobs): in `skip`, or in
    the Parquet file `skip_file` (`uid` column) when found by Ray tasks (`feature_units`)."""

    index: int
    fingerprint: str
    blobs: str
    skip: frozenset[str] = frozenset()
    skip_file: str | None = None

    def skipped(self) -> set[str]:
        if self.skip_file is None:
            return set(self.skip)
        return set(self.skip) | set(pq.read_table(self.skip_file, columns=["uid"])["uid"].to_pylist())


SKIP_TASKS_FROM = 32  # ingest partitions from which `feature_units` finds the skipped uids in Ray tasks
SKIP_UIDS_PER_BUCKET = 1 << 21  # uids one of those tasks holds (~150 B each in Arrow and sets)


def feature_units(run_dir: Path, *, partitioned: bool | None = None) -> list[FeatUnit]:
    """A unit per ingest partition, skipping the uids an earlier partition holds. In this
    process (every uid in one set) below SKIP_TASKS_FROM partitions; from there (or with
    `partitioned=True`) by uid buckets in Ray tasks, so no process holds the pool's uids: the
    same units and fingerprints either way."""
    from lvd.curation.stages.embed import embed_units  # the driver's import (torch), not the workers'

    embed = embed_units(run_dir)
    if partitioned is None:
        partitioned = len(embed) >= SKIP_TASKS_FROM
    if partitioned:
        return _feature_units_bucketed(run_dir, embed)
    units, seen = [], set()
    for u in embed:
        uids = set(pq.read_table(u.blobs, columns=["uid"])["uid"].to_pylist())
        skip = frozenset(uids & seen)
        seen |= uids
        units.append(FeatUnit(u.index, _skip_fingerprint(u.fingerprint, skip), u.blobs, skip))
    return units


def _skip_fingerprint(fingerprint: str, skip) -> str:
    """A partition is redone when what it skips changes (an earlier partition was re-ingested)."""
    return f"{fingerprint}:{runner.config_hash(sorted(skip))}" if skip else fingerprint


def _feature_units_bucketed(run_dir: Path, embed: list) -> list[FeatUnit]:
    """feature_units' rule in three waves of Ray tasks (`fanout.parallel_map`) over files
    under RUN/copyfeat/skip/ (P + B + P files, as `stages.decontam`'s pool index): each
    partition's uids, sorted by crc32 bucket; per bucket, each uid's first partition and the
    later ones holding it; per partition with skips, its sorted list (the `skip_file`) and its
    fingerprint's digest. The driver holds the (partition, bucket) pairs that have skips."""
    import shutil

    work = rundir.stage_dir(run_dir, "copyfeat") / "skip"
    shutil.rmtree(work, ignore_errors=True)
    records = sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values())
    buckets = max(1, -(-records // SKIP_UIDS_PER_BUCKET))
    fanout.parallel_map(_SkipMap(str(work), buckets), [(u.index, u.blobs) for u in embed])
    got = fanout.parallel_map(_SkipReduce(str(work)), list(range(buckets)))
    late: dict[int, list[int]] = {}  # partition -> the buckets holding its skipped uids
    for bucket, parts in enumerate(got):
        for index in parts:
            late.setdefault(index, []).append(bucket)
    has = sorted(late)
    digests = dict(zip(has, fanout.parallel_map(_SkipGather(str(work)), [(p, late[p]) for p in has])))
    units = []
    for u in embed:
        if u.index in digests:
            fingerprint = f"{u.fingerprint}:{digests[u.index]}"
            units.append(FeatUnit(u.index, fingerprint, u.blobs, skip_file=str(work / f"p{u.index:06d}.parquet")))
        else:
            units.append(FeatUnit(u.index, u.fingerprint, u.blobs))
    return units


@dataclass(frozen=True)
class _SkipMap:
    work: str
    buckets: int

    def __call__(self, item: tuple[int, str]) -> None:
        """One partition's distinct uids with its index, sorted by bucket: one file."""
        index, blobs = item
        uids = pq.read_table(blobs, columns=["uid"])["uid"].unique()
        t = pa.table({"uid": uids, "p": np.full(len(uids), index, np.int64)})
        uidbuckets.write_sorted(t, Path(self.work) / "map" / f"p{index:06d}.parquet", self.buckets)


@dataclass(frozen=True)
class _SkipReduce:
    work: str

    def __call__(self, bucket: int) -> list[int]:
        """This bucket's uids held by a partition after their first one, sorted by partition
        (one file, late/bNNNNN); returns those partitions."""
        mine = pc.field("bucket") == bucket
        files = sorted((Path(self.work) / "map").glob("p*.parquet"))
        t = pa.concat_tables([pq.read_table(f, columns=["uid", "p"], filters=mine) for f in files])
        first = t.group_by("uid").aggregate([("p", "min")])
        t = t.join(first, "uid")
        t = t.filter(pc.greater(t["p"], t["p_min"])).select(["uid", "p"]).sort_by([("p", "ascending")])
        if not t.num_rows:
            return []
        path = Path(self.work) / "late" / f"b{bucket:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_parquet(path, t, row_group_size=uidbuckets.GROUP_ROWS)
        return np.unique(t["p"].to_numpy()).tolist()


@dataclass(frozen=True)
class _SkipGather:
    work: str

    def __call__(self, item: tuple[int, list[int]]) -> str:
        """One partition's skipped uids (from the buckets holding some), sorted, as its skip
        file; their digest, as `_skip_fingerprint` takes it."""
        index, buckets = item
        mine, late = pc.field("p") == index, Path(self.work) / "late"
        uids = sorted(
            u for b in buckets for u in pq.read_table(late / f"b{b:05d}.parquet", filters=mine)["uid"].to_pylist()
        )
        table = pa.table({"uid": pa.array(uids, pa.string())})
        durable.write_parquet(Path(self.work) / f"p{index:06d}.parquet", table)
        return runner.config_hash(uids)


@dataclass(frozen=True)
class FeatFn:
    cfg: FeatureConfig

    def __call__(self, unit: FeatUnit) -> dict[str, pa.Table]:
        set_threads(1)
        rows, done = [], unit.skipped()
        for batch in pq.ParquetFile(unit.blobs).iter_batches(batch_size=256, columns=["uid", "data"]):
            for uid, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if uid not in done:  # each uid once: the first partition, the first row holding it
                    done.add(uid)
                    rows.append(features_row(uid, data, self.cfg))
        return {"": pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA)}


def run_copyfeat(
    run_dir: Path,
    cfg: FeatureConfig = FeatureConfig(),
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    progress: runner.ProgressFn | None = None,
) -> runner.StageReport:
    """Local features etc. of every accepted blob, one Ray task per ingest partition."""
    import shutil

    report = runner.map_partitions(
        FeatFn(cfg),
        feature_units(run_dir),
        rundir.stage_dir(run_dir, "copyfeat"),
        cfg_hash=runner.config_hash(cfg, FEATURES_VERSION),
        runner=rcfg,
        progress=progress,
    )
    shutil.rmtree(rundir.stage_dir(run_dir, "copyfeat") / "skip", ignore_errors=True)  # the markers keep their digests
    return report


@dataclass
class PoolFeatures:
    """Features of a run's unique accepted images, in `uids` order."""

    uids: np.ndarray  # object [N]
    pixels: np.ndarray  # int64 [N]
    aspect: np.ndarray  # float64 [N] width / height
    feats: list[Features]
    glob: np.ndarray  # float32 [N, GLOBAL_DIM]
    nhash: np.ndarray  # uint8 [N, 32]
    nhash_flip: np.ndarray


def read_features(run_dir: Path) -> PoolFeatures:
    t = rundir.unique_accepted(run_dir, ["uid", "width", "height"])
    uids = t["uid"].to_pylist()
    w, h = t["width"].to_numpy().astype(np.int64), t["height"].to_numpy().astype(np.int64)
    pixels, aspect = w * h, w / np.maximum(h, 1)
    rows: dict[str, dict] = {}
    for path in sorted(rundir.stage_dir(run_dir, "copyfeat").glob("part-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            rows.setdefault(r["uid"], r)
    missing = [u for u in uids if u not in rows]
    if missing:
        raise RuntimeError(
            f"{run_dir}/copyfeat has no features for {len(missing)} accepted images "
            f"(first {missing[0]}): the copyfeat stage did not finish"
        )
    ordered = [rows[u] for u in uids]
    n = len(ordered)
    glob = np.stack([np.frombuffer(r["glob"], np.float32) for r in ordered]) if n else np.zeros((0, 144), np.float32)
    nh = np.frombuffer(b"".join(r["nhash"] for r in ordered), np.uint8).reshape(n, 32)
    nf = np.frombuffer(b"".join(r["nhash_flip"] for r in ordered), np.uint8).reshape(n, 32)
    feats = [Features.from_row(r) for r in ordered]
    return PoolFeatures(np.asarray(uids, dtype=object), pixels, aspect, feats, glob, nh, nf)


# ---------------------------------------------------------------- deciding pairs


@dataclass(frozen=True)
class PackedFeatures:
    """Many images' `Features` in flat arrays (row i's keypoints: `kp[start[i]:start[i + 1]]`):
    one object-store object of eight arrays, which a Ray task reads in microseconds, where a
    list of Features pickles four arrays per image (~70 ms per verification task at 2,343)."""

    kp: np.ndarray  # float32 [M, 2]
    desc: np.ndarray  # uint8 [M, 32]
    start: np.ndarray  # int64 [N + 1]
    kp_flip: np.ndarray
    desc_flip: np.ndarray
    start_flip: np.ndarray
    size: np.ndarray  # int64 [N, 2] feature image width, height
    up: np.ndarray  # float64 [N] Features.up

    @classmethod
    def of(cls, feats: list[Features]) -> PackedFeatures:
        def flat(arrays, width, dtype):
            start = np.r_[0, np.cumsum([len(x) for x in arrays])].astype(np.int64)
            return (np.concatenate(arrays) if arrays else np.zeros((0, width), dtype)).reshape(-1, width), start

        kp, start = flat([f.kp for f in feats], 2, np.float32)
        desc, _ = flat([f.desc for f in feats], DESC_BYTES, np.uint8)
        kpf, start_f = flat([f.kp_flip for f in feats], 2, np.float32)
        descf, _ = flat([f.desc_flip for f in feats], DESC_BYTES, np.uint8)
        size = np.array([f.size for f in feats], np.int64).reshape(-1, 2)
        up = np.array([f.up for f in feats], np.float64)
        return cls(kp, desc, start, kpf, descf, start_f, size, up)

    def __len__(self) -> int:
        return len(self.size)

    def __getitem__(self, i: int) -> Features:
        s, e, sf, ef = self.start[i], self.start[i + 1], self.start_flip[i], self.start_flip[i + 1]
        w, h = self.size[i].tolist()
        return Features(
            self.kp[s:e], self.desc[s:e], self.kp_flip[sf:ef], self.desc_flip[sf:ef], (w, h), float(self.up[i])
        )


@dataclass(frozen=True)
class VerifyBatch:
    """Picklable Ray work: verify pairs of rows of the shared features."""

    cfg: cd.CopyDetectConfig
    enough: int

    def __call__(self, feats: list[Features] | PackedFeatures, pairs: np.ndarray) -> list[int]:
        set_threads(1)
        return cd.verify_pairs(feats, pairs[:, 0], pairs[:, 1], self.cfg.verify, self.enough).tolist()


def verify_many(
    feats: list[Features], a: np.ndarray, b: np.ndarray, cfg: cd.CopyDetectConfig, enough: int
) -> np.ndarray:
    """Scores of pairs (a, b), verified in Ray tasks of VERIFY_BATCH pairs; the features go
    into the object store once, packed (`PackedFeatures`), and every task reads them from there."""
    pairs = np.stack([np.asarray(a, np.int64), np.asarray(b, np.int64)], axis=1)
    work = [pairs[s : s + VERIFY_BATCH] for s in range(0, len(pairs), VERIFY_BATCH)]
    shared = PackedFeatures.of(feats) if len(work) > 1 else feats  # one batch runs here: no packing
    out = fanout.parallel_map(VerifyBatch(cfg, enough), work, shared=shared)
    return np.array([s for part in out for s in part], np.int64)


class Decider:
    """Scores and decides pairs by local features, or by a copy model's cosine."""

    def __init__(
        self, feats: list[Features], copy_vecs: np.ndarray | None, cal: cd.Calibration, cfg: cd.CopyDetectConfig
    ):
        self.feats, self.vecs, self.cal, self.cfg = feats, copy_vecs, cal, cfg
        self.checks = 0

    @property
    def method(self) -> str:
        return self.cal.method

    def scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.checks += len(a)
        if self.vecs is not None:
            return np.einsum("nd,nd->n", self.vecs[a].astype(np.float32), self.vecs[b].astype(np.float32)).astype(
                np.float64
            )
        return verify_many(self.feats, a, b, self.cfg, int(np.ceil(self.cal.threshold))).astype(np.float64)

    def links(self, scores: np.ndarray) -> np.ndarray:
        return self.cal.links(np.asarray(scores, np.float64))

    def linked(self, i: int, j: int) -> bool:
        return bool(self.links(self.scores(np.array([i]), np.array([j])))[0])

    def distance(self, scores: np.ndarray) -> np.ndarray:
        if self.vecs is not None:
            return np.clip(1.0 - scores, 0.0, 2.0)
        return 1.0 / (1.0 + scores)


# ---------------------------------------------------------------- calibration


def run_calibration(
    run_dir: Path, sample: list[str], cfg: cd.CopyDetectConfig, copy_model: tuple[str, dict] | None
) -> cd.Calibration:
    """Known copies of a sample of the pool's own images (`sample`: the uids of
    `copydetect.calibration_sample`'s rows of the unique accepted ones, in row order; the
    partitioned path draws the same sample without the list): threshold, recall, false links."""
    blobs = rundir.read_blobs(run_dir, set(sample))
    copies_of = cfg.calib_copy_images if copy_model is None else None  # see CopyDetectConfig
    copies, distinct = cd.calibration_pairs([blobs[u] for u in sample], cfg.seed, copies_of)
    if copy_model is None:
        copy_scores, distinct_scores = _local_scores(copies, distinct, cfg)
        return cd.calibrate(cd.METHOD_LOCAL, copy_scores, distinct_scores, cfg, images=min(len(sample), copies_of))
    copy_scores, distinct_scores = model_scores(_copy_embedder(copy_model), copies, distinct)
    return cd.calibrate(cd.METHOD_MODEL, copy_scores, distinct_scores, cfg, images=len(sample))


def model_scores(
    emb, copies: dict[str, list[tuple[bytes, bytes]]], distinct: list[tuple[bytes, bytes]]
) -> tuple[dict[str, list[float]], list[float]]:
    """Cosines of the copy model's vectors of every calibration pair. Each distinct image is
    embedded once, in one pass (an original has a copy of every kind, and it used to be
    embedded once per kind: 1,166 images instead of 836 for 53 sampled images)."""
    uniq = list(dict.fromkeys(d for pairs in [*copies.values(), distinct] for pair in pairs for d in pair))
    row = {d: i for i, d in enumerate(uniq)}
    vecs = emb.embed_images(uniq).astype(np.float32) if uniq else np.zeros((0, 0), np.float32)

    def score(pairs):
        if not pairs:
            return []
        va = vecs[[row[x] for x, _ in pairs]]
        vb = vecs[[row[y] for _, y in pairs]]
        return np.einsum("nd,nd->n", va, vb).astype(np.float64).tolist()

    return {k: score(v) for k, v in copies.items()}, score(distinct)


CALIB_TASK_PAIRS = 48  # calibration pairs per Ray task (features of their images, then their scores)


def _local_scores(
    copies: dict[str, list[tuple[bytes, bytes]]], distinct: list[tuple[bytes, bytes]], cfg: cd.CopyDetectConfig
) -> tuple[dict[str, list[int]], list[int]]:
    """Full verification scores (no threshold gate) of every calibration pair, in one round of
    Ray tasks: each task gets whole units of pairs (all copies of one original, so it is
    described once; or distinct pairs), finds the features of each blob once and scores the
    pairs there, so no features travel back (before: 8 rounds, one per kind, each original's
    features found 7 times: 1,408 images described instead of 1,022 at 64 sampled images)."""
    # units of pairs that share blobs: an original's copies (one unit per original), each distinct pair
    units: dict[bytes, list[tuple[str | None, int, bytes, bytes]]] = {}
    for kind, pairs in copies.items():
        for i, (x, y) in enumerate(pairs):
            units.setdefault(x, []).append((kind, i, x, y))
    todo = list(units.values()) + [[(None, i, x, y)] for i, (x, y) in enumerate(distinct)]
    work: list[list] = [[]]
    for unit in todo:
        if work[-1] and len(work[-1]) + len(unit) > CALIB_TASK_PAIRS:
            work.append([])
        work[-1] += unit
    work = [w for w in work if w]
    got = fanout.parallel_map(_ScorePairs(cfg), [[(x, y) for _, _, x, y in w] for w in work])
    copy_scores: dict[str, list[int]] = {k: [0] * len(v) for k, v in copies.items()}
    distinct_scores = [0] * len(distinct)
    for w, scores in zip(work, got):
        for (kind, i, _, _), s in zip(w, scores):
            (distinct_scores if kind is None else copy_scores[kind])[i] = s
    return copy_scores, distinct_scores


@dataclass(frozen=True)
class _ScorePairs:
    """Picklable Ray work: full scores of pairs of encoded images (each distinct blob's features once)."""

    cfg: cd.CopyDetectConfig

    def __call__(self, pairs: list[tuple[bytes, bytes]]) -> list[int]:
        set_threads(1)
        uniq = list(dict.fromkeys(d for pair in pairs for d in pair))
        row = {d: i for i, d in enumerate(uniq)}
        feats = [local_features(d, self.cfg.features) for d in uniq]
        a = np.array([row[x] for x, _ in pairs], np.int64)
        b = np.array([row[y] for _, y in pairs], np.int64)
        return cd.verify_pairs(feats, a, b, self.cfg.verify, 1 << 30).tolist()


def _copy_embedder(copy_model: tuple[str, dict]):
    from lvd.curation.embed import EmbedConfig, Embedder

    spec, embed_cfg = copy_model
    return Embedder(spec, EmbedConfig(**embed_cfg))


# ---------------------------------------------------------------- the pool


@dataclass(frozen=True)
class CopyDetectFn:
    run_dir: str
    cfg: cd.CopyDetectConfig
    proposers: tuple[str, ...]  # vector store folders that propose neighbours (embedder)
    copy_model: tuple[str, dict] | None  # (spec, EmbedConfig kwargs) deciding by cosine
    mirror_radius: int = 20  # the hash dedup's equalised radius, for mirrored copies

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        t0 = time.perf_counter()
        run, cfg = Path(self.run_dir), self.cfg
        # the calibration's Ray tasks run while this task reads the features and finds the
        # candidates (it needs neither)
        with ThreadPoolExecutor(1) as pool_:
            uids = rundir.unique_accepted(run, ["uid"])["uid"].to_pylist()
            sample = [uids[r] for r in cd.calibration_sample(uids, cfg.calib_images, cfg.seed)]
            cal_job = pool_.submit(_timed, run_calibration, run, sample, cfg, self.copy_model)
            pool = read_features(run)
            n = len(pool.uids)
            copy_vecs = open_vectors(rundir.vectors_dir(run, "copyembed")).get(pool.uids) if self.copy_model else None
            t_read = time.perf_counter()
            a, b, pa_, pb_, groups, hp = self._candidates(run, pool, copy_vecs)
            t_cand = time.perf_counter()
            cal, seconds_cal = cal_job.result()
        t_cal = time.perf_counter()
        decider = Decider(pool.feats, copy_vecs, cal, cfg)
        scores = decider.scores(a, b)
        keep = decider.links(scores)
        t_verify = time.perf_counter()
        ea = np.concatenate([a[keep], pa_])
        eb = np.concatenate([b[keep], pb_])
        rank = representative_rank(pool.pixels, pool.uids)
        split = cd.split_chains(n, ea, eb, rank, decider.linked, cfg.max_centres, group=groups)
        t_split = time.perf_counter()
        dist = dict(
            zip(
                zip(np.minimum(a, b)[keep].tolist(), np.maximum(a, b)[keep].tolist()),
                decider.distance(scores[keep]).tolist(),
            )
        )
        phash = set(zip(np.minimum(pa_, pb_).tolist(), np.maximum(pa_, pb_).tolist()))
        sets = _edge_sets(split, phash, dist, decider, groups)
        table = resolve(pool.uids, pool.pixels, sets)
        check_removal(
            "copy detection",
            table.num_rows,
            n,
            cfg.max_remove,
            largest=cd.largest_groups(pool.uids, split.edges_a, split.edges_b),
            detail=cal.summary() + ". ",
        )
        stats = dict(
            images=n,
            candidates=len(a),
            hash_candidates=len(hp[0]),
            decided_links=int(keep.sum()),
            phash_links=len(pa_),
            components_split=split.components_split,
            split_checks=split.extra_checks,
            unresolved=split.unresolved,
            duplicates=table.num_rows,
            method=cal.method,
            seconds_read=t_read - t0,
            seconds_calibrate=seconds_cal,  # overlaps the candidates
            seconds_calibrate_wait=t_cal - t_cand,  # what it added after them
            seconds_candidates=t_cand - t_read,
            seconds_verify=t_verify - t_cal,
            seconds_split=t_split - t_verify,
        )
        return {"": table, "calibration": _json_table(cal.as_dict()), "stats": _json_table(stats)}

    def _candidates(self, run: Path, pool: PoolFeatures, copy_vecs: np.ndarray | None):
        """(a, b) candidate pairs to decide; the hash-decided pairs and their groups; hash candidates."""
        cfg, n = self.cfg, len(pool.uids)
        pa_, pb_ = phash_pairs(pool.uids, run)
        ma, mb = cd.mirror_hash_pairs(pool.nhash, pool.nhash_flip, self.mirror_radius, np.log(pool.aspect), 1.1)
        pa_, pb_ = np.concatenate([pa_, ma]), np.concatenate([pb_, mb])
        groups = hash_groups(n, pa_, pb_)
        hp = cd.hash_candidates(pool.nhash, pool.nhash_flip, cfg.hash_radius)
        knn = [cd.descriptor_candidates(pool.feats, cfg.k), cd.knn_lists(pool.glob, cfg.k)]
        # embedder vectors searched where they lie: one index in-process, sharded over Ray when large
        knn += [shardindex.knn_lists(d, pool.uids, cfg.k) for d in self.proposers]
        if copy_vecs is not None:  # searched where they lie too, as the partitioned path does
            knn.append(shardindex.knn_lists(rundir.vectors_dir(run, "copyembed"), pool.uids, cfg.k))
        a, b = cd.bounded_candidates(n, hp, knn, cfg.max_verify, group=groups)
        return a, b, pa_, pb_, groups, hp


def _timed(fn, *args):
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def _edge_sets(split: cd.Split, phash: set, dist: dict, decider: Decider, group: np.ndarray) -> list[EdgeSet]:
    """Star edges by how their pair was linked: hashes (the dedup stage's groups and mirrored
    hash pairs), a decision, or a decision of the split step."""
    by: dict[str, tuple[list, list, list]] = {"phash": ([], [], []), decider.method: ([], [], [])}
    for m, c in zip(split.edges_a.tolist(), split.edges_b.tolist()):
        key = (min(m, c), max(m, c))
        method = "phash" if key in phash or group[m] == group[c] else decider.method
        d = 0.0 if method == "phash" else dist.get(key)
        if d is None:  # decided during splitting
            d = float(decider.distance(decider.scores(np.array([m]), np.array([c])))[0])
        by[method][0].append(key[0])
        by[method][1].append(key[1])
        by[method][2].append(d)
    return [
        EdgeSet(k, np.array(a, np.int64), np.array(b, np.int64), np.array(d, np.float64)) for k, (a, b, d) in by.items()
    ]


def hash_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label per row of the hash-decided pairs (singletons label themselves)."""
    from lvd.curation.unionfind import UnionFind

    uf = UnionFind(n)
    uf.union_edges(np.asarray(a, np.int64), np.asarray(b, np.int64))
    return uf.roots()


def phash_pairs(uids: np.ndarray, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The hash dedup stage's groups as (member, representative) row pairs."""
    if (dups := rundir.hash_duplicates(run_dir)) is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = {u: i for i, u in enumerate(uids.tolist())}
    a = np.array([pos[u] for u in dups["uid"].to_pylist()], np.int64)
    b = np.array([pos[u] for u in dups["duplicate_of"].to_pylist()], np.int64)
    return a, b


def _json_table(d: dict) -> pa.Table:
    return pa.table({"json": pa.array([json.dumps(d, sort_keys=True)], pa.string())})


def calibration(run_dir: Path) -> cd.Calibration | None:
    d = rundir.copydetect_output(run_dir, "calibration")
    return cd.Calibration.from_dict(d) if d else None


def weakest_links(run_dir: Path, n: int) -> list[tuple[str, str, str, float]]:
    """(uid, duplicate_of, method, score) of the `n` decided copy links with the least evidence
    (fewest inliers, or lowest cosine), weakest first: where a look-alike would show. Arrow's
    top-k over the table's columns: no Python row per duplicate."""
    d = duplicates(run_dir)
    d = d.filter(pc.is_in(d["method"], pa.array([cd.METHOD_LOCAL, cd.METHOD_MODEL])))
    if not d.num_rows or n < 1:
        return []
    top = d.take(
        pc.select_k_unstable(d, k=min(n, d.num_rows), sort_keys=[("distance", "descending"), ("uid", "ascending")])
    )

    def score(method: str, distance: float) -> float:
        return round(1.0 / distance - 1.0) if method == cd.METHOD_LOCAL else 1.0 - distance

    cols = [top[c].to_pylist() for c in ("uid", "duplicate_of", "method", "distance")]
    return [(u, o, m, float(score(m, dist))) for u, o, m, dist in zip(*cols)]


def copydetect_stats(run_dir: Path) -> dict | None:
    return rundir.copydetect_output(run_dir, "stats")


def run_copydetect(
    run_dir: Path,
    cfg: cd.CopyDetectConfig,
    *,
    proposers: list[Path] = (),
    copy_model: tuple[str, dict] | None = None,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    partitioned: bool | None = None,
    scale=None,
) -> runner.StageReport:
    """One Ray task holding the pool, or `scale.copyscale`'s partitioned path (the same outputs):
    `partitioned` True / False forces one, None partitions from copyscale.PARTITIONED_MIN_IMAGES
    ingest records on (local-feature or copy-model decisions); `scale` (copyscale.CopyScaleConfig)
    sizes it."""
    from lvd.curation.scale import copyscale

    extra = [rundir.stage_dir(Path(p).parent, "embed") for p in proposers]  # the proposers' embed markers
    if copy_model:
        extra.append(rundir.stage_dir(run_dir, "copyembed"))
    unit = runner.WholeStage(fingerprint=rundir.input_digest(run_dir, "copydetect", *extra), stem="duplicates")
    if copyscale.chooses(run_dir, partitioned, copy_model):
        parts = copyscale.StageParts(run_calibration, Decider, _edge_sets, _json_table)  # reused as they are
        kw = dict(parts=parts, proposers=proposers, copy_model=copy_model, rcfg=rcfg, scale=scale)
        return copyscale.run_partitioned(run_dir, cfg, unit, **kw)
    fn = CopyDetectFn(str(run_dir), cfg, tuple(str(p) for p in proposers), copy_model)
    return runner.map_partitions(
        fn, [unit], rundir.stage_dir(run_dir, "copydetect"), cfg_hash=runner.config_hash(cfg, copy_model), runner=rcfg
    )


def duplicates(run_dir: Path) -> pa.Table:
    """The run's final duplicate groups (`rundir.duplicates`), empty before any dedup ran."""
    found = rundir.duplicates(run_dir)
    return DUPLICATES_SCHEMA.empty_table() if found is None else found
