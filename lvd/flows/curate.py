"""The Prefect flow `curate`: ingest (+ pool hygiene) -> [domain cap] -> dedup -> copy features ->
[embed] -> copy detection -> [decontaminate] -> [cluster -> retrieve] -> shard -> ledger, one
Prefect task per stage (the later ones in `lvd.flows.curate_tasks`).

Copy detection and decontamination need no model: local features decide, an embedder or hashes
only propose (`lvd.curation.copydetect`); `copy_model` (SSCD TorchScript or any backbone)
decides by a calibrated cosine instead. Clustering and retrieval need an embedder
(`embedder`: lvd checkpoint, official DINOv2 `.pth` or HF Dinov2 folder); without one, seeds
and a target size are refused with a clear error, and the run ships every image that is not a
duplicate, a copy or contaminated. `vectors` (a folder of precomputed embeddings keyed by uid or
source) stands in for the embedder on the pool, and on seed / eval sets when no embedder is given
(`lvd.curation.stages.embed.run_given`).

Guard: a stage that would remove more than `max_remove_fraction` of its input (default: 0.9
for dedup and copy detection, 0.5 for decontamination) raises `MassRemovalError`; the flow
then shows the largest groups as pictures, deletes what it created in the run folder, and
fails with one message naming the stage, the fraction and the flag.

Each task fans its stage out as Ray tasks over partitions (`lvd.curation.stages.ingest_dedup`), never one
Prefect task per image (about 0.2 s each through Prefect vs about 1 ms through Ray). Resume
comes from the partition done-markers: a killed flow started again with the same `out`
skips every done partition. Each stage reports a progress artifact while it runs, a table
of its counts, and dedup a few duplicate groups as pictures.

Pool hygiene (`hygiene`, `lvd.curation.hygiene.from_options`): URL block / allow lists, quality
filters, an NSFW model and face detection run inside ingest (rejections are ingest records); the
per-domain cap runs after it; the `hygiene` task reports a table and a gallery, and the
summary's `hygiene` lines say which stage was on (the NSFW one says "off (no model)").

Parameters are plain JSON values (config dicts, not dataclasses) so the Prefect UI shows
them and any client can start the flow; they become validated configs inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lvd import runfolder
from lvd.curation import actor_runner, ledger, rundir, runner, snapshot
from lvd.curation import hygiene as hyg
from lvd.curation.copydetect import CopyDetectConfig
from lvd.curation.dedup import DedupConfig
from lvd.curation.embed import EmbedConfig
from lvd.curation.guard import MassRemovalError
from lvd.curation.ingest import IngestConfig
from lvd.curation.scale.budget import WorkerBudget, ledger_range_rows
from lvd.curation.shards import ShardConfig
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.stages.retrieve import RetrieveConfig
from lvd.curation.stages.select import ClusterConfig
from lvd.flows import artifacts
from lvd.flows import curate_tasks as tasks

NO_EMBEDDER = (
    "{what} need(s) image embeddings: pass --embedder (an lvd checkpoint, an official DINOv2 "
    ".pth file or a local Hugging Face Dinov2 folder) or --vectors DIR (precomputed), or run "
    "`lvd pipeline`, which pretrains a "
    "small bootstrap embedder on the pool when none is given."
)
DEDUP_MAX_REMOVE = 0.9  # default guard of dedup and copy detection (copy-heavy dumps exist)
DECONTAM_MAX_REMOVE = 0.5  # default guard of decontamination (the paper's removed about a third)
# the copy model's eval transform: SSCD's for a TorchScript descriptor model (288 px, ImageNet
# normalisation, centre square), DINOv2's (256 -> 224) for a backbone
SSCD_EMBED = {"resize": 288, "crop": 288}
BACKBONE_EMBED = {"resize": 256, "crop": 224}


def copy_model_embed(spec: str) -> dict:
    from lvd.curation.embed import is_torchscript

    return dict(SSCD_EMBED if is_torchscript(spec) else BACKBONE_EMBED)


@dataclass(frozen=True, kw_only=True)
class CurateSummary:
    """What `curate` returns: where the run is and whether its accounting holds."""

    run_dir: str
    partitions: int
    ingest_ran: int
    ingest_skipped: int
    by_status: dict[str, int]
    by_reason: dict[str, int]
    problems: list[str]
    hygiene: tuple[str, ...] = ()  # one line per pool-hygiene stage: on/off and what it removed

    @property
    def ok(self) -> bool:
        return not self.problems


@task(name="ingest", cache_policy=NO_CACHE)  # done-markers are the cache
def ingest_task(
    inputs: list[str], run_dir: Path, partition_size: int, cfg: IngestConfig, rcfg: runner.RunnerConfig
) -> runner.StageReport:
    log = get_run_logger()
    partitions = stages.plan(inputs, partition_size)
    if not partitions:
        raise ValueError(f"no files, tar members or parquet rows found in {inputs}: nothing to curate")
    log.info("ingest: %d partitions from %d inputs", len(partitions), len(inputs))
    progress = artifacts.Progress("curate-ingest-progress", "ingest: partitions done")
    rep = stages.run_ingest(partitions, run_dir, cfg, rcfg, progress)
    log.info("ingest: ran %d partitions, %d already done", len(rep.ran), len(rep.skipped))
    artifacts.count_table(
        "curate-ingest-counts",
        "ingest: inputs per status and reason",
        artifacts.ingest_status_rows(rundir.ingest_manifests(run_dir)),  # a partition at a time
    )
    return rep


@task(name="dedup", cache_policy=NO_CACHE)  # done-markers are the cache
def dedup_task(
    run_dir: Path,
    cfg: DedupConfig,
    rcfg: runner.RunnerConfig,
    max_remove: float = DEDUP_MAX_REMOVE,
    budget: WorkerBudget | None = None,
) -> runner.StageReport:
    progress = artifacts.Progress("curate-dedup-progress", "dedup: global near-duplicate search")
    partitioned, shuffle = tasks.dedup_sizes(tasks.ingest_records(run_dir), budget) if budget else (None, None)
    stage = stages.run_dedup(run_dir, cfg, rcfg, max_remove=max_remove, partitioned=partitioned, shuffle=shuffle)
    progress(1, 1)
    _report_duplicates(run_dir)
    return stage


def _report_duplicates(run_dir: Path) -> None:
    """Counts per method, and the largest groups as pictures."""
    dups = rundir.hash_duplicates(run_dir)  # Arrow columns: no Python object per duplicate
    n_groups = len(pc.value_counts(dups["duplicate_of"]))
    get_run_logger().info("dedup: %d near-duplicate uids in %d groups", dups.num_rows, n_groups)
    artifacts.count_table(
        "curate-dedup-counts",
        "dedup: near-duplicate uids per method",
        [{"method": m, "duplicates": n} for m, n in sorted(tasks.value_counts(dups["method"]).items())]
        + [{"method": "groups", "duplicates": n_groups}],
    )
    shown = tasks.largest_groups(dups, artifacts.MAX_GROUPS, artifacts.MAX_PER_GROUP)
    uids = {kept for kept, _ in shown} | {u for _, ds in shown for u, _, _ in ds[: artifacts.MAX_PER_GROUP]}
    artifacts.gallery_artifact(
        "curate-dedup-groups",
        artifacts.duplicate_gallery_markdown(shown, rundir.read_blobs(run_dir, uids, strict=False)),
    )


@task(name="ledger", cache_policy=NO_CACHE)  # done-markers are the cache
def ledger_task(run_dir: Path, budget: WorkerBudget | None = None) -> ledger.VerifyReport:
    log = get_run_logger()
    progress = artifacts.Progress("curate-ledger-progress", "ledger: accounting of every input")
    # the range rows change how the ledger is split into files, not its rows
    sizes = {"range_rows": ledger_range_rows(budget)} if budget else {}
    for seed_run in ledger.sub_runs(run_dir, ("seeds",)):
        ledger.write_parts(seed_run, **sizes)  # shipped seeds (include_seeds) become `sharded` there
    written = ledger.write_parts(run_dir, **sizes)
    report = ledger.verify_run(run_dir)
    progress(1, 1)
    artifacts.count_table(
        "curate-ledger-counts",
        "ledger: inputs per status and reason",
        written.count_rows(),
    )
    log.info("ledger: %d inputs %s", report.inputs, report.by_status)
    for problem in report.problems:
        log.error("verify: %s", problem)
    return report


@flow(name="curate")
def curate(
    inputs: list[str],
    out: str,
    partition_size: int = 256,
    ingest: dict | None = None,
    dedup: dict | None = None,
    max_retries: int = 3,
    ray_address: str | None = None,
    seeds: list[str] | None = None,
    eval_sets: list[str] | None = None,
    embedder: str | None = None,
    vectors: str | None = None,
    retrieval: str = "sample",
    target_size: int | None = None,
    shard_size: int = 1000,
    embed: dict | None = None,
    copy_detection: bool = True,
    copy_model: str | None = None,
    copydetect: dict | None = None,
    max_remove_fraction: float | None = None,
    cluster: dict | None = None,
    retrieve: dict | None = None,
    shard: dict | None = None,
    hygiene: dict | None = None,
    mode: str = "resume",
    worker_memory: int | str | None = None,
) -> CurateSummary:
    """Curate `inputs` into the run folder `out` (see the module doc for the stages; `mode`:
    resume | extend | overwrite, see lvd.runfolder)."""
    params = dict(locals())  # as given: the run folder records the ones that change outputs
    budget = WorkerBudget.parse(worker_memory) if worker_memory else None  # refuses a too-small one
    if partition_size < 1:
        raise ValueError(f"partition_size={partition_size}: use at least 1 input per partition")
    seeds, eval_sets = list(seeds or []), list(eval_sets or [])
    needs = [w for w, on in (("--seeds", seeds), ("--target-size", target_size is not None)) if on]
    embeds = bool(embedder or vectors)  # vectors given (the pool's; sub-runs' too without an embedder) or computed
    if needs and not embeds:
        raise ValueError(NO_EMBEDDER.format(what=", ".join(needs)))
    if eval_sets and not copy_detection:
        raise ValueError(
            "--eval-sets: decontamination is copy detection against the eval images; drop --no-copy-detection"
        )
    if copy_model and not copy_detection:
        raise ValueError("--copy-model is for copy detection; drop --no-copy-detection")
    if retrieval == "hierarchical" and target_size is None:
        raise ValueError("--retrieval hierarchical samples the pool to a size: pass --target-size N")
    if max_remove_fraction is not None and not 0 < max_remove_fraction <= 1:
        raise ValueError(f"--max-remove-fraction {max_remove_fraction}: use a fraction in (0, 1]")
    hygiene_cfg, max_per_domain = hyg.from_options(hygiene)  # URL lists, quality, NSFW, faces; domain cap
    sub_ingest_cfg = IngestConfig(**(ingest or {}))  # seed / eval sets: no pool hygiene
    ingest_cfg, dedup_cfg = IngestConfig(**{**(ingest or {}), "hygiene": hygiene_cfg}), DedupConfig(**(dedup or {}))
    shard_cfg = ShardConfig(**{"shard_size": shard_size, **(shard or {})})
    retrieve_cfg = RetrieveConfig(**{"method": retrieval, "target": target_size, **(retrieve or {})})
    cluster_cfg = ClusterConfig(**{"hierarchical": retrieval == "hierarchical", **(cluster or {})})
    embed_cfg = EmbedConfig(**(embed or {}))
    copy_cfg = CopyDetectConfig(**{"max_remove": max_remove_fraction or DEDUP_MAX_REMOVE, **(copydetect or {})})
    decontam_cfg = CopyDetectConfig(**{**(copydetect or {}), "max_remove": max_remove_fraction or DECONTAM_MAX_REMOVE})
    copy_spec = (str(copy_model), copy_model_embed(copy_model)) if copy_model else None
    rcfg = runner.RunnerConfig(max_retries=max_retries)
    run_dir = Path(out).resolve()
    before = snapshot.take(run_dir)
    # Refuses another run's folder, locks it (held until the process or `lvd curate` releases it).
    inputs = runfolder.claim(run_dir, inputs, runfolder.curate_settings(params), mode).inputs
    run_dir.mkdir(parents=True, exist_ok=True)
    runner.init_ray(ray_address)
    get_run_logger().info("curate: %d inputs -> %s", len(inputs), run_dir)
    try:
        ing = ingest_task(inputs, run_dir, partition_size, ingest_cfg, rcfg)
        hygiene_lines = tasks.hygiene_task(run_dir, inputs, partition_size, hygiene_cfg, max_per_domain, ingest_cfg)
        dedup_task(run_dir, dedup_cfg, rcfg, copy_cfg.max_remove, budget)
        tasks.drop_stale_stages(
            run_dir,
            embedder=embeds,
            eval_sets=bool(eval_sets),
            retrieve=bool(seeds) or target_size is not None,
            copy_detection=copy_detection,
        )
        acfg = actor_runner.ActorConfig()
        subs: dict[str, dict[str, Path]] = {}
        if copy_detection:
            tasks.copyfeat_task(run_dir, copy_cfg.features, rcfg)
        if vectors:
            tasks.embed_task(run_dir, "pool", vectors, embed_cfg, acfg, given=True)
        elif embedder:
            tasks.embed_task(run_dir, "pool", embedder, embed_cfg, acfg)
        if copy_spec:
            tasks.embed_task(run_dir, "pool", copy_spec[0], EmbedConfig(**copy_spec[1]), acfg, copy_model=True)
        if copy_detection:
            proposers = [rundir.vectors_dir(run_dir)] if embeds else []
            tasks.copydetect_task(run_dir, copy_cfg, rcfg, proposers=proposers, copy_model=copy_spec, budget=budget)
        for kind, paths in (("seeds", seeds), ("eval", eval_sets)):
            for name, path in tasks.sub_run_names(paths).items():
                sub = subs.setdefault(kind, {})[name] = rundir.sub_run(run_dir, kind, name)
                tasks.sub_run_task(
                    [path],
                    sub,
                    partition_size,
                    sub_ingest_cfg,
                    dedup_cfg,
                    rcfg,
                    copy_cfg.features if kind == "eval" else None,
                )
                if embedder:
                    tasks.embed_task(sub, f"{kind} {name}", embedder, embed_cfg, acfg)
                elif vectors:
                    tasks.embed_task(sub, f"{kind} {name}", vectors, embed_cfg, acfg, given=True)
                if copy_spec and kind == "eval":
                    tasks.embed_task(
                        sub, f"{kind} {name}", copy_spec[0], EmbedConfig(**copy_spec[1]), acfg, copy_model=True
                    )
        if eval_sets:
            tasks.decontam_task(
                run_dir,
                subs["eval"],
                decontam_cfg,
                rcfg,
                proposer="vectors" if embeds else None,
                copy_model=copy_spec,
                budget=budget,
                dedup_cfg=dedup_cfg,
            )
        if embeds:
            tasks.cluster_task(run_dir, cluster_cfg, rcfg, budget)
            if seeds or target_size is not None:
                tasks.retrieve_task(run_dir, subs.get("seeds", {}), retrieve_cfg, rcfg, budget)
    except Exception as e:
        refused = _refusal(e)
        if refused is None:
            raise
        _report_refusal(run_dir, refused)
        changed = snapshot.rollback(run_dir, before)
        if changed:
            get_run_logger().warning("files changed before the refusal (not restored): %s", changed[:5])
        raise refused from None
    tasks.shard_task(run_dir, shard_cfg, rcfg, budget)
    report = ledger_task(run_dir, budget)
    return CurateSummary(
        run_dir=str(run_dir),
        partitions=ing.total,
        ingest_ran=len(ing.ran),
        ingest_skipped=len(ing.skipped),
        by_status=report.by_status,
        by_reason=report.by_reason,
        problems=report.problems,
        hygiene=tuple(hygiene_lines),
    )


def _refusal(e: BaseException) -> MassRemovalError | None:
    """The guard's error, also when Ray wrapped it (RayTaskError keeps it as `cause`)."""
    for err in (e, getattr(e, "cause", None), e.__cause__):
        if isinstance(err, MassRemovalError):
            return MassRemovalError(err.stage, err.removed, err.total, err.limit, err.flag, err.largest, err.detail)
    return None


def _report_refusal(run_dir: Path, err: MassRemovalError) -> None:
    """The refusal in the flow log, and the largest groups as pictures (before the rollback)."""
    from lvd.flows import pictures

    get_run_logger().error("%s", err)
    uids = {u for g in err.largest for u in g[: pictures.PER_ROW]}
    md = pictures.components_markdown(
        f"{err.stage} refused: largest groups it would have removed",
        err.largest,
        rundir.read_blobs(run_dir, uids, strict=False),
    )
    artifacts.gallery_artifact(f"curate-{err.stage.replace(' ', '-')}-refused", md)
