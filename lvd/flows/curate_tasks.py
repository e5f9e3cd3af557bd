"""Prefect tasks of the curation stages after ingest and dedup: sub-runs (seeds, eval sets),
copy features, embed, copy detection, decontamination, cluster, retrieve, shard. One Prefect task per stage; each fans out as Ray
work (`lvd.curation.stages_*`), reports progress and a counts table, and a few stages a picture.
Done-markers are the cache (NO_CACHE): a rerun skips what is done and redoes nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lvd.curation import actor_runner, ledger, rundir, runner
from lvd.curation.copydetect import CopyDetectConfig
from lvd.curation.dedup import DedupConfig
from lvd.curation.embed import EmbedConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.localfeat import FeatureConfig
from lvd.curation.scale import budget as B
from lvd.curation.scale import shardindex
from lvd.curation.scale.hashdedup import ShuffleConfig
from lvd.curation.shards import ShardConfig
from lvd.curation.stages import copy as stages_copy
from lvd.curation.stages import decontam as stages_decontam
from lvd.curation.stages import embed as stages_embed
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.stages import select as stages_select
from lvd.curation.stages.retrieve import RetrieveConfig, run_retrieve
from lvd.flows import artifacts, pictures


def sub_run_names(paths: list[str]) -> dict[str, str]:
    """A folder name per seed / eval input (its file or folder name, made unique)."""
    names: dict[str, str] = {}
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(p).name.split(".")[0]) or "set"
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}-{i}"
        names[name] = p
    return names


def drop_stale_stages(
    run_dir: Path, *, embedder: bool, eval_sets: bool, retrieve: bool, copy_detection: bool = True
) -> None:
    """Remove outputs of stages this run will not run (an earlier run with other options
    wrote them): the ledger and the shard stage would otherwise still read them. Vectors and
    features stay (costly, and keyed by uid and config)."""
    runs = {"copydetect": copy_detection, "cluster": embedder, "decontam": eval_sets, "retrieve": embedder and retrieve}
    for stage in rundir.stale_stages({name for name, on in runs.items() if on}):
        shutil.rmtree(rundir.stage_dir(run_dir, stage), ignore_errors=True)


@task(name="embed", cache_policy=NO_CACHE)
def embed_task(
    run_dir: Path,
    label: str,
    spec: str,
    cfg: EmbedConfig,
    acfg: actor_runner.ActorConfig,
    *,
    copy_model: bool = False,
    given: bool = False,
) -> runner.StageReport:
    """Embed with the embedder (RUN/vectors), or with the copy model (RUN/copyvec); `given`:
    `spec` is a folder of precomputed vectors, imported instead (stages.embed.run_given)."""
    what = "copy-embed" if copy_model else "embed"
    stage = "copyembed" if copy_model else "embed"
    progress = artifacts.Progress(f"curate-{what}-{_key(label)}-progress", f"{what} {label}: partitions done")
    if given:
        rep = stages_embed.run_given(run_dir, spec, progress, stage=stage)
    else:
        rep = stages_embed.run_embed(run_dir, spec, cfg, acfg, progress, stage=stage)
    n = sum(pq.read_table(rep.stage_dir / m["outputs"]["main"])["vectors"][0].as_py() for m in rep.markers.values())
    get_run_logger().info(
        "%s %s: %d vectors, %d partitions ran, %d done before", what, label, n, len(rep.ran), len(rep.skipped)
    )
    artifacts.count_table(
        f"curate-{what}-{_key(label)}-counts",
        f"{what} {label}",
        [
            {"what": "vectors", "count": n},
            {"what": "partitions run", "count": len(rep.ran)},
            {"what": "partitions already done", "count": len(rep.skipped)},
        ],
    )
    return rep


def _key(label: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", label.lower())


@task(name="sub-run", cache_policy=NO_CACHE)
def sub_run_task(
    inputs: list[str],
    run_dir: Path,
    partition_size: int,
    icfg: IngestConfig,
    dcfg: DedupConfig,
    rcfg: runner.RunnerConfig,
    fcfg: FeatureConfig | None = None,
) -> dict[str, int]:
    """Ingest + dedup (+ copy features, for eval sets) + ledger of a seed or eval set in its own run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    partitions = stages.plan(inputs, partition_size)
    if not partitions:
        raise ValueError(f"no images found in {inputs} (seed set or eval set)")
    stages.run_ingest(partitions, run_dir, icfg, rcfg)
    stages.run_dedup(run_dir, dcfg, rcfg)
    if fcfg is not None:
        stages_copy.run_copyfeat(run_dir, fcfg, rcfg)
    return ledger.write_parts(run_dir).by_status


@task(name="copy-features", cache_policy=NO_CACHE)
def copyfeat_task(run_dir: Path, cfg: FeatureConfig, rcfg: runner.RunnerConfig) -> runner.StageReport:
    progress = artifacts.Progress(
        "curate-copyfeat-progress", "copy features: ORB keypoints, global descriptor, equalised hashes"
    )
    rep = stages_copy.run_copyfeat(run_dir, cfg, rcfg, progress)
    get_run_logger().info("copy features: %d partitions ran, %d done before", len(rep.ran), len(rep.skipped))
    return rep


@task(name="copy-detection", cache_policy=NO_CACHE)
def copydetect_task(
    run_dir: Path,
    cfg: CopyDetectConfig,
    rcfg: runner.RunnerConfig,
    *,
    proposers: list[Path],
    copy_model: tuple[str, dict] | None,
    budget: B.WorkerBudget | None = None,
) -> None:
    log = get_run_logger()
    progress = artifacts.Progress("curate-copydetect-progress", "copy detection: candidates, calibration, decisions")
    with B.job_budget(budget):  # the proposers' k-NN (scale.shardindex.knn_lists, in the stage's task) sizes by it
        stages_copy.run_copydetect(run_dir, cfg, proposers=proposers, copy_model=copy_model, rcfg=rcfg)
    progress(1, 1)
    d = rundir.duplicates(run_dir)
    cal, stats = stages_copy.calibration(run_dir), stages_copy.copydetect_stats(run_dir)
    counts = value_counts(d["method"])
    log.info("copy detection: %s", cal.summary())
    log.info(
        "copy detection: %d candidate pairs, %d linked, %d components split; duplicates %s",
        stats["candidates"],
        stats["decided_links"],
        stats["components_split"],
        dict(counts),
    )
    artifacts.count_table(
        "curate-copydetect-counts",
        "copy detection: duplicates per linking method, and the work done",
        [{"what": f"duplicates ({m})", "count": n} for m, n in sorted(counts.items())]
        + [
            {"what": k.replace("_", " "), "count": stats[k]}
            for k in ("images", "candidates", "hash_candidates", "decided_links", "components_split", "split_checks")
        ],
    )
    artifacts.gallery_artifact("curate-copydetect-calibration", pictures.calibration_markdown(cal.as_dict()))
    weak = stages_copy.weakest_links(run_dir, pictures.MAX_ROWS)
    blobs = rundir.read_blobs(run_dir, {u for w in weak for u in w[:2]}, strict=False)
    artifacts.gallery_artifact("curate-copydetect-weakest", pictures.weakest_links_markdown(weak, blobs, cal.threshold))


@task(name="decontaminate", cache_policy=NO_CACHE)
def decontam_task(
    run_dir: Path,
    eval_dirs: dict[str, Path],
    cfg: CopyDetectConfig,
    rcfg: runner.RunnerConfig,
    *,
    proposer: str | None,
    copy_model: tuple[str, dict] | None,
    budget: B.WorkerBudget | None = None,
    dedup_cfg: DedupConfig | None = None,  # the hash dedup's rules: pairs they link are copies
) -> None:
    progress = artifacts.Progress("curate-decontam-progress", "decontamination: copies of eval images")
    with B.job_budget(budget):  # the pool's k-NN (scale.shardindex.knn_lists, in the stage's task) sizes by it
        stages_decontam.run_decontam(
            run_dir, eval_dirs, cfg, proposer=proposer, copy_model=copy_model, rcfg=rcfg, dedup_cfg=dedup_cfg
        )
    progress(1, 1)
    t = rundir.decontaminated(run_dir)
    counts = value_counts(t["eval_set"])
    get_run_logger().info("decontaminate: %d pool images removed as copies of eval images %s", t.num_rows, dict(counts))
    artifacts.count_table(
        "curate-decontam-counts",
        "pool images removed per eval set (copies of its images, and their duplicates)",
        [{"eval_set": n, "removed": counts.get(n, 0)} for n in sorted(eval_dirs)],
    )


def ingest_records(run_dir: Path) -> int:
    """Ingest records of the run (all statuses): what the dedup's one task would hold."""
    return sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values())


def dedup_sizes(n_records: int, budget: B.WorkerBudget | None) -> tuple[bool | None, ShuffleConfig | None]:
    """`run_dedup`'s `partitioned` and `shuffle` under a worker budget ((None, None) without one:
    today's choice and sizes). The one-task path holds every record (HASH_RECORD_BYTES x HASH_WORK
    each): when that is over the budget's data share the shuffle is forced. The budget only raises
    the exact buckets above the default; the pair blocks are the fewest that fit (at least one
    per exact bucket), since each record queries (blocks + 1) / 2 of them. Outputs are the same
    either way (scale.hashdedup equals the one task), so none of this enters the dedup fingerprint."""
    if budget is None:
        return None, None
    d = ShuffleConfig()
    exact, blocks = B.hash_shuffle_sizes(n_records, budget, min_buckets=d.exact_buckets)
    shuffle = ShuffleConfig(
        buckets=blocks,  # the fewest that fit: blocks cost work
        exact_buckets=exact,
        partitions=d.partitions,  # the edge count is not known before the shuffle
        task_options=B.ray_options(budget),
    )
    one_task = n_records * B.HASH_RECORD_BYTES * B.HASH_WORK
    return (True if one_task > budget.data_bytes else None), shuffle


def _pool_vectors(run_dir: Path) -> tuple[int, int]:
    """Rows and dimension of the pool's vectors (memory-mapped: nothing read)."""
    from lvd.curation.vectors import open_vectors

    store = open_vectors(rundir.vectors_dir(run_dir))
    return len(store), store.dim


def cluster_sizes(
    cfg: stages_select.ClusterConfig, n_rows: int, dim: int, budget: B.WorkerBudget | None
) -> stages_select.ClusterConfig:
    """`cfg` with the distributed k-means' rows per actor from the budget, only where the pool is
    large enough for the distributed engine (smaller pools keep `cfg`, so their fingerprint), and
    partitioned (`scale.pcluster`) where the stage's one task could not hold the pool under the
    budget (`budget.cluster_task_images`). The actors themselves also size by the job's budget
    (`scale.dkmeans`, `cluster_task`)."""
    one_task_full = budget is not None and n_rows > B.cluster_task_images(budget)
    if one_task_full and cfg.partitioned is None and cfg.engine in ("auto", "ray"):
        cfg = dataclasses.replace(cfg, partitioned=True)
    distributed = cfg.engine == "ray" or cfg.partitioned or (cfg.engine == "auto" and n_rows >= cfg.distributed_above)
    if budget is None or not distributed or cfg.actors is not None or cfg.rows_per_actor is not None:
        return cfg
    k = cfg.k or max(1, round(math.sqrt(n_rows)))
    block_rows = cfg.lloyd(k).blocks(n_rows, dim)
    return dataclasses.replace(cfg, rows_per_actor=B.kmeans_shard_rows(budget, dim, k, block_rows=block_rows))


def retrieve_sizes(cfg: RetrieveConfig, n_rows: int, dim: int, budget: B.WorkerBudget | None) -> RetrieveConfig:
    """`cfg` with the sharded k-NN sized by the budget (`shardindex.sized`: rows per shard, query
    block, and sharded at all when the pool does not fit one worker), only where the pool is
    sharded (smaller pools keep `cfg`, so their fingerprint)."""
    if budget is None:
        return cfg
    knn = shardindex.sized(dataclasses.replace(cfg.knn, budget=budget), n_rows, dim, cfg.k, subset=True)
    return cfg if n_rows < knn.sharded_above else dataclasses.replace(cfg, knn=knn)


@task(name="cluster", cache_policy=NO_CACHE)
def cluster_task(
    run_dir: Path, cfg: stages_select.ClusterConfig, rcfg: runner.RunnerConfig, budget: B.WorkerBudget | None = None
) -> None:
    progress = artifacts.Progress("curate-cluster-progress", "cluster: spherical k-means")
    if budget is not None:
        cfg = cluster_sizes(cfg, *_pool_vectors(run_dir), budget)
    with B.job_budget(budget):  # the k-means actors (scale.dkmeans, in the stage's task) size by it
        stages_select.run_cluster(run_dir, cfg, rcfg)
    progress(1, 1)
    t, h = stages_select.read_clusters(run_dir)
    rows = [
        {
            "level": lvl,
            "clusters": len(h.levels[lvl - 1].centroids_KD),
            "largest": int(h.sizes(lvl).max(initial=0)),
            "images": t.num_rows,
        }
        for lvl in range(1, len(h.levels) + 1)
    ]
    artifacts.count_table("curate-cluster-counts", "clusters per level (1 = finest)", rows)
    shown, sizes = largest_clusters(t, pictures.MAX_ROWS, pictures.PER_ROW)
    uids = {u for us in shown.values() for u in us}
    md = pictures.cluster_montage_markdown(shown, sizes, rundir.read_blobs(run_dir, uids, strict=False))
    artifacts.gallery_artifact("curate-cluster-montage", md)


@task(name="retrieve", cache_policy=NO_CACHE)
def retrieve_task(
    run_dir: Path,
    seed_dirs: dict[str, Path],
    cfg: RetrieveConfig,
    rcfg: runner.RunnerConfig,
    budget: B.WorkerBudget | None = None,
) -> None:
    progress = artifacts.Progress("curate-retrieve-progress", "retrieve: seeds / balanced sampling")
    if budget is not None:
        cfg = retrieve_sizes(cfg, *_pool_vectors(run_dir), budget)
    with B.job_budget(budget):
        run_retrieve(run_dir, seed_dirs, cfg, rcfg)
    progress(1, 1)
    sel = rundir.selection(run_dir)
    counts = rundir.selection(run_dir, "counts").to_pylist()
    get_run_logger().info("retrieve: %d images selected %s", sel.num_rows, counts)
    artifacts.count_table("curate-retrieve-counts", "retrieval per seed set (collisions, caps)", counts)
    _retrieval_pictures(run_dir, sel, seed_dirs)


def _retrieval_pictures(run_dir: Path, sel, seed_dirs: dict[str, Path]) -> None:
    t, h = stages_select.read_clusters(run_dir)
    if t.num_rows == 0 or not h.levels:  # nothing left to cluster (e.g. all decontaminated)
        return
    before, after = cluster_sizes_selected(t, sel, len(h.levels[0].centroids_KD))
    artifacts.gallery_artifact("curate-retrieve-histogram", pictures.histogram_markdown(before, after))
    shown = seed_pairs(sel, pictures.MAX_ROWS, pictures.PER_ROW)
    blobs = rundir.read_blobs(run_dir, {u for got in shown.values() for u, _ in got[: pictures.PER_ROW]}, strict=False)
    for name, seed in shown:
        blobs.update(rundir.read_blobs(seed_dirs[name], {seed}, strict=False))
    md = pictures.retrieval_markdown({seed: got for (_, seed), got in shown.items()}, blobs)
    artifacts.gallery_artifact("curate-retrieve-pairs", md)


@task(name="shard", cache_policy=NO_CACHE)
def shard_task(
    run_dir: Path, cfg: ShardConfig, rcfg: runner.RunnerConfig, budget: B.WorkerBudget | None = None
) -> None:
    progress = artifacts.Progress("curate-shard-progress", "shard: WebDataset tars written")
    sizes = {"range_rows": B.shard_plan_range_rows(budget)} if budget else {}  # the plan's files, not its rows
    rep = stages_select.run_shards(run_dir, cfg, rcfg, progress, **sizes)
    samples, tars, size = shard_totals(pq.read_table(rundir.manifest_path(run_dir), columns=["shard", "shard_bytes"]))
    get_run_logger().info("shard: %d samples in %d tars (%d written now)", samples, tars, len(rep.ran))
    artifacts.count_table(
        "curate-shard-counts",
        "shards",
        [
            {"what": "samples", "count": samples},
            {"what": "tars", "count": tars},
            {"what": "tars written now", "count": len(rep.ran)},
            {"what": "tars already done", "count": len(rep.skipped)},
            {"what": "bytes", "count": size},
        ],
    )


@task(name="hygiene", cache_policy=NO_CACHE)
def hygiene_task(
    run_dir: Path, inputs: list[str], partition_size: int, cfg, max_per_domain: int | None, icfg: IngestConfig
) -> list[str]:
    """The per-domain cap (global, after ingest), then the hygiene report: a table of rejections
    per reason, a gallery of rejected and face-blurred examples, and one line per stage for the
    run summary (the NSFW line says when it is off)."""
    from lvd.curation import hygiene, urlfilter
    from lvd.curation.shards.image import store_image

    log = get_run_logger()
    capped = urlfilter.run_domain_cap(run_dir, max_per_domain)
    records = hygiene.hygiene_records(run_dir)
    counts = Counter(r["reason"] for r in records if r["status"] == "rejected")
    faces = [r for r in records if r["status"] == "accepted"]
    lines = _hygiene_lines(cfg, max_per_domain, counts, capped.num_rows, faces)
    for line in lines:
        log.info("%s", line)
    artifacts.count_table(
        "curate-hygiene-counts",
        "pool hygiene: inputs rejected per reason, faces blurred",
        [{"reason": r, "inputs": counts.get(r, 0)} for r in hygiene.REASONS]
        + [{"reason": "images with faces (blurred in the shards)", "inputs": len(faces)}],
    )
    shown: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == "rejected" and len(shown[r["reason"]]) < pictures.PER_ROW:
            shown[r["reason"]].append(r)
    picked = [r for rs in shown.values() for r in rs]
    data = hygiene.example_bytes(picked, stages.plan(inputs, partition_size), icfg.source_limits())
    rejected = {reason: [(r["source"], _label(r), data.get(r["source"])) for r in rs] for reason, rs in shown.items()}
    blobs = rundir_blobs(run_dir, {r["uid"] for r in faces[: pictures.PER_ROW]})
    blurred = []
    for r in faces[: pictures.PER_ROW]:
        boxes = stages_select.face_boxes(r["detail"])
        raw = blobs.get(r["uid"])
        img = store_image(raw, max_side=512, quality=90, faces=boxes).data if raw else None
        blurred.append((r["source"], len(boxes), img))
    artifacts.gallery_artifact("curate-hygiene-gallery", pictures.hygiene_markdown(rejected, blurred))
    return lines


def _label(r: dict) -> str:
    import json

    d = json.loads(r["detail"]) if r["detail"] else {}
    what = d.get("rule") or (f"{d['metric']}={d['value']:g}" if "metric" in d else f"score={d.get('nsfw', '?')}")
    return f"{r['source'].rsplit('/', 1)[-1][:24]}: {what}"


def rundir_blobs(run_dir: Path, uids: set[str]) -> dict[str, bytes]:
    from lvd.curation import rundir

    return rundir.read_blobs(run_dir, uids, strict=False)


def _hygiene_lines(cfg, max_per_domain, counts: Counter, n_capped: int, faces: list) -> list[str]:
    from lvd.curation import nsfw

    q = cfg.quality if cfg else None
    urls = (len(cfg.url_block), len(cfg.url_allow)) if cfg else (0, 0)
    quality = ", ".join(
        f"{r} {counts.get(r, 0)}" for r in ("near_constant", "extreme_aspect", "too_blurry", "mostly_border")
    )
    return [
        f"url filter: {'on' if any(urls) else 'off'} ({urls[0]} block rules, {urls[1]} allow rules): "
        f"url_blocked {counts.get('url_blocked', 0)}",
        "domain cap: " + (f"{max_per_domain} images per domain: domain_capped {n_capped}" if max_per_domain else "off"),
        "quality filters: " + (f"on: {quality}" if q else "off"),
        nsfw.summary(cfg.nsfw if cfg else None) + (f": nsfw {counts.get('nsfw', 0)}" if cfg and cfg.nsfw else ""),
        "face blurring: " + (f"on: {len(faces)} images with faces" if cfg and cfg.faces else "off"),
    ]


# ---------------------------------------------------------------- summaries without a Python row per image
# The flow's process reads these stages' tables to report them; Arrow and numpy columns, never
# a Python object per image (142M uids as Python strings would be ~15 GB).


def value_counts(column) -> Counter:
    """Counter of a string column's values (Arrow's value_counts)."""
    vc = pc.value_counts(column)
    return Counter(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))


def largest_clusters(t, top: int, per: int) -> tuple[dict[int, list[str]], dict[int, int]]:
    """The `top` largest leaf clusters (by size, then id): their first `per` members in table
    order, and their sizes."""
    leaf = t["leaf"].to_numpy()
    if not len(leaf):
        return {}, {}
    sizes = np.bincount(leaf)
    ids = np.flatnonzero(sizes)
    order = ids[np.lexsort((ids, -sizes[ids]))][:top]
    shown = {int(c): t["uid"].take(np.flatnonzero(leaf == c)[:per]).to_pylist() for c in order}
    return shown, {int(c): int(sizes[c]) for c in order}


def largest_groups(dups, top: int, per: int) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """The `top` largest duplicate groups (by size, then representative uid): each
    representative with its first `per` (uid, method, distance) rows in table order."""
    vc = pc.value_counts(dups["duplicate_of"])
    reps, sizes = vc.field("values").to_pylist(), vc.field("counts").to_numpy()
    out = []
    for i in sorted(range(len(reps)), key=lambda i: (-sizes[i], reps[i]))[:top]:
        rows = dups.filter(pc.equal(dups["duplicate_of"], reps[i])).slice(0, per)
        got = zip(rows["uid"].to_pylist(), rows["method"].to_pylist(), rows["distance"].to_pylist())
        out.append((reps[i], [(u, m, float(d)) for u, m, d in got]))
    return out


def cluster_sizes_selected(t, sel, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf cluster sizes of the pool, and of the selection (its uids looked up in the pool's table)."""
    before = np.bincount(t["leaf"].to_numpy(), minlength=k)
    pos = pc.index_in(sel["uid"], value_set=t["uid"])
    if pos.null_count:
        raise KeyError(f"{pos.null_count} selected uids are not in the cluster table")
    after = np.bincount(t["leaf"].to_numpy()[pos.to_numpy()], minlength=k)
    return before, after


def seed_pairs(sel, top: int, per: int) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """The first `top` (seed set, seed) keys in sorted order, each with its first `per`
    retrieved (uid, similarity) in table order."""
    f = sel.filter(pc.and_(pc.is_valid(sel["seed_uid"]), pc.not_equal(sel["seed_uid"], "")))
    if not f.num_rows:
        return {}
    keys = f.select(["seed_set", "seed_uid"]).group_by(["seed_set", "seed_uid"]).aggregate([])
    keys = keys.sort_by([("seed_set", "ascending"), ("seed_uid", "ascending")]).slice(0, top)
    out = {}
    for name, seed in zip(keys["seed_set"].to_pylist(), keys["seed_uid"].to_pylist()):
        rows = f.filter(pc.and_(pc.equal(f["seed_set"], name), pc.equal(f["seed_uid"], seed))).slice(0, per)
        out[(name, seed)] = list(zip(rows["uid"].to_pylist(), rows["similarity"].to_pylist()))
    return out


def shard_totals(m) -> tuple[int, int, int]:
    """(samples, tars, bytes) of the manifest's (shard, shard_bytes) columns: a row per sample,
    each tar's bytes on every one of its rows."""
    per_tar = m.group_by("shard").aggregate([("shard_bytes", "max")])
    return m.num_rows, per_tar.num_rows, int(pc.sum(per_tar["shard_bytes_max"]).as_py() or 0)
