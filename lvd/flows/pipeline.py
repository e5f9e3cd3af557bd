"""The Prefect flow `pipeline`: curate -> pretrain -> k-NN eval -> export, as one run.

Layout under OUT: `run/` (curation run folder: ledger, shards), `pretrain/` (training
output: metrics, checkpoints, pictures), `hf/` (the teacher backbone as a Hugging Face
Dinov2 folder). `curate` and `pretrain` run as subflows, so the Prefect UI shows each with
its own tasks and artifacts under the pipeline run.

Every parameter is checked before any work starts (nothing is created under OUT when a
check fails), and all problems are reported at once.

Bootstrap: seeds and a target size need an embedder (retrieval, clustering). When none is
given, a `tiny` model is first trained on the pool: it is curated alone into
`OUT/bootstrap/run` (ingest and hash dedup only), trained for `bootstrap_steps` into
`OUT/bootstrap/pretrain`, and that run folder becomes the embedder. It serves retrieval and
clustering, and proposes copy candidates; it never decides what is a copy or contaminated
(model-free copy detection does), so a weak bootstrap cannot empty the pool. Eval sets alone
need no embedder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lvd import runfolder
from lvd.curation import rundir
from lvd.flows.curate import CurateSummary, curate
from lvd.flows.pretrain_flow import PretrainSummary, pretrain

BOOTSTRAP_RECIPE = "tiny"
# Curate options the bootstrap curation (no embedder) accepts; retrieval settings are not.
BASE_CURATE_KEYS = (
    "partition_size",
    "ingest",
    "dedup",
    "max_retries",
    "ray_address",
    "shard_size",
    "max_remove_fraction",
    "mode",
    "worker_memory",
)


@dataclass(frozen=True, kw_only=True)
class PipelineSummary:
    """What `pipeline` returns: the sub-run summaries and where the exported model is."""

    out: str
    curate: CurateSummary
    pretrain: PretrainSummary
    hf_dir: str
    embedder: str | None
    bootstrapped: bool


def _missing(paths: list[str] | None, flag: str) -> list[str]:
    return [f"{flag} {p}: no such file or folder" for p in paths or [] if not Path(p).exists()]


def validate(
    *,
    inputs: list[str],
    out: str,
    recipe: str,
    max_steps: int | None,
    batch_size: int | None,
    seeds: list[str],
    eval_sets: list[str],
    embedder: str | None,
    knn_train: str | None,
    knn_val: str | None,
    bootstrap_steps: int,
    curate_options: dict,
    nproc_per_node: int = 1,
) -> None:
    """Raise ValueError listing every problem with the parameters (before any work)."""
    from lvd.pretrain.recipes import RECIPES

    problems = [] if inputs else ["no --input given: pass at least one dump to curate"]
    problems += _missing(inputs, "--input") + _missing(seeds, "--seeds")
    problems += _missing(eval_sets, "--eval-sets")
    if twice := sorted({i for i in inputs if inputs.count(i) > 1}):
        problems.append(f"--input given more than once (each input must count once): {', '.join(twice)}")
    if recipe not in RECIPES:
        problems.append(f"unknown recipe {recipe!r}: use one of {', '.join(sorted(RECIPES))}")
    for name, value in (
        ("--max-steps", max_steps),
        ("--batch-size", batch_size),
        ("--bootstrap-steps", bootstrap_steps),
        ("--nproc-per-node", nproc_per_node),
    ):
        if value is not None and value < 1:
            problems.append(f"{name} {value}: use at least 1")
    if embedder is not None:
        problems += _missing([embedder], "--embedder")
    if (knn_train is None) != (knn_val is None):
        problems.append("k-NN evaluation needs both --knn-train and --knn-val (labelled DIR/<class>/*.png)")
    for flag, d in (("--knn-train", knn_train), ("--knn-val", knn_val)):
        if d is not None and not Path(d).is_dir():
            problems.append(f"{flag} {d}: not a folder of class sub-folders")
    if curate_options.get("retrieval") == "hierarchical" and curate_options.get("target_size") is None:
        problems.append("--retrieval hierarchical samples the pool to a size: pass --target-size N")
    if clash := sorted({"inputs", "out", "seeds", "eval_sets", "embedder"} & set(curate_options)):
        problems.append(f"curate_options must not set {', '.join(clash)}: they are pipeline parameters")
    if Path(out).exists() and not Path(out).is_dir():
        problems.append(f"--out {out}: exists and is not a folder")
    if problems:
        raise ValueError("pipeline parameters refused:\n  - " + "\n  - ".join(problems))


def _shards(run_dir: str) -> list[str]:
    found = sorted(str(p) for p in rundir.shards_dir(run_dir).glob("shard-*.tar"))
    if not found:
        raise RuntimeError(
            f"curation of {run_dir} shipped no images (no shards): nothing to "
            "pretrain on; check the ledger with `lvd verify`"
        )
    return found


def _curated(summary: CurateSummary) -> CurateSummary:
    if summary.problems:
        raise RuntimeError("curation accounting is broken, not training on it:\n  " + "\n  ".join(summary.problems))
    return summary


def _bootstrap(root: Path, data: list[str], steps: int, batch_size: int | None, curate_kw: dict) -> str:
    """Curate the pool alone (hash dedup) and train a tiny model on it; returns its run folder."""
    log = get_run_logger()
    log.warning(
        "no --embedder: bootstrapping one for retrieval and clustering: a `%s` model "
        "trained for %d steps on the hash-deduplicated pool (%d input(s)); copies and "
        "contamination are decided by model-free copy detection, not by it",
        BOOTSTRAP_RECIPE,
        steps,
        len(data),
    )
    base = {k: v for k, v in curate_kw.items() if k in BASE_CURATE_KEYS}
    boot = _curated(curate(inputs=data, out=str(root / runfolder.PIPELINE_RUN), copy_detection=False, **base))
    pretrain(
        shards=_shards(boot.run_dir),
        out=str(root / "pretrain"),
        recipe=BOOTSTRAP_RECIPE,
        max_steps=steps,
        batch_size=batch_size,
    )
    log.info("bootstrap embedder ready: %s", root / "pretrain")
    return str(root / "pretrain")


@task(name="export-hf", cache_policy=NO_CACHE)
def export_task(checkpoint: str, hf_dir: Path) -> Path:
    from lvd.pretrain.checkpoint import load_teacher_backbone
    from lvd.pretrain.models.hf import export_hf

    path = export_hf(load_teacher_backbone(checkpoint), hf_dir)
    get_run_logger().info("export: teacher backbone of %s -> %s (Hugging Face Dinov2)", checkpoint, path)
    return path


def _summary_markdown(s: PipelineSummary) -> str:
    knn = s.pretrain.knn_top1
    return "\n".join(
        [
            "# Pipeline summary",
            "",
            "| | |",
            "|---|---|",
            f"| curation run | `{s.curate.run_dir}` |",
            f"| inputs by status | {', '.join(f'{k}: {v}' for k, v in sorted(s.curate.by_status.items()))} |",
            f"| embedder | {'bootstrapped ' if s.bootstrapped else ''}`{s.embedder}` |",
            f"| pretraining | `{s.pretrain.recipe}`, steps {s.pretrain.start_step} -> {s.pretrain.end_step}, "
            f"relaunches {s.pretrain.relaunches} |",
            f"| k-NN top-1 | {'not run' if knn is None else f'{100 * knn:.2f}%'} |",
            f"| Hugging Face folder | `{s.hf_dir}` |",
        ]
    )


@flow(name="pipeline")
def pipeline(
    inputs: list[str],
    out: str,
    recipe: str = "tiny",
    max_steps: int | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    seeds: list[str] | None = None,
    eval_sets: list[str] | None = None,
    embedder: str | None = None,
    bootstrap_steps: int = 100,
    knn_train: str | None = None,
    knn_val: str | None = None,
    knn_k: int = 20,
    curate_options: dict | None = None,
    nproc_per_node: int = 1,
    mode: str = "resume",
) -> PipelineSummary:
    """Curate `inputs`, pretrain `recipe` on the shards, evaluate, export (module doc; `mode`:
    resume | extend | overwrite of OUT, see lvd.runfolder)."""
    params = dict(locals())  # as given: OUT records the ones that change outputs
    inputs, seeds, eval_sets = [str(i) for i in inputs], list(seeds or []), list(eval_sets or [])
    validate(
        inputs=inputs,
        out=out,
        recipe=recipe,
        max_steps=max_steps,
        batch_size=batch_size,
        seeds=seeds,
        eval_sets=eval_sets,
        embedder=embedder,
        knn_train=knn_train,
        knn_val=knn_val,
        bootstrap_steps=bootstrap_steps,
        curate_options=curate_options or {},
        nproc_per_node=nproc_per_node,
    )
    root, log = Path(out).resolve(), get_run_logger()
    # Refuses another pipeline's OUT and locks it; overwrite deletes run/, pretrain/, hf/, bootstrap/.
    inputs = runfolder.claim(
        root, inputs, runfolder.pipeline_settings(params), mode, outputs=runfolder.PIPELINE_OUTPUTS, kind="pipeline"
    ).inputs
    curate_kw = {**(curate_options or {}), "mode": "extend" if mode == "extend" else "resume"}
    bootstrapped = embedder is None and not curate_kw.get("vectors") and bool(seeds or curate_kw.get("target_size"))
    if bootstrapped:
        embedder = _bootstrap(root / "bootstrap", inputs, bootstrap_steps, batch_size, curate_kw)
    log.info("pipeline [1/4] curate %d input(s) -> %s", len(inputs), root / runfolder.PIPELINE_RUN)
    cur = _curated(
        curate(
            inputs=inputs,
            out=str(root / runfolder.PIPELINE_RUN),
            seeds=seeds,
            eval_sets=eval_sets,
            embedder=embedder,
            **curate_kw,
        )
    )
    log.info("pipeline [2/4] pretrain %s on %s", recipe, rundir.shards_dir(root / runfolder.PIPELINE_RUN))
    pre = pretrain(
        shards=_shards(cur.run_dir),
        out=str(root / "pretrain"),
        recipe=recipe,
        max_steps=max_steps,
        batch_size=batch_size,
        num_workers=num_workers,
        knn_train=knn_train,
        knn_val=knn_val,
        knn_k=knn_k,
        nproc_per_node=nproc_per_node,
    )
    log.info(
        "pipeline [3/4] k-NN top-1: %s",
        "skipped (no --knn-train/--knn-val)" if pre.knn_top1 is None else f"{100 * pre.knn_top1:.2f}%",
    )
    log.info("pipeline [4/4] export the teacher backbone -> %s", root / "hf")
    hf = export_task(pre.checkpoint, root / "hf")
    summary = PipelineSummary(
        out=str(root), curate=cur, pretrain=pre, hf_dir=str(hf), embedder=embedder, bootstrapped=bootstrapped
    )
    create_markdown_artifact(
        markdown=_summary_markdown(summary), key="pipeline-summary", description="curate -> pretrain -> k-NN -> export"
    )
    return summary
