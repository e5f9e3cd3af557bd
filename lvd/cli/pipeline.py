"""`lvd pipeline`: curate dumps, pretrain DINOv2 on the shards, evaluate and export, in one
Prefect flow (`pipeline`, with `curate` and `pretrain` as subflows).

Output under --out: run/ (curation run folder: ledger/, shards/), pretrain/
(config.json, metrics.jsonl, checkpoints/, pictures/), hf/ (the teacher backbone as a
Hugging Face Dinov2 folder, loadable with transformers' AutoModel).

Eval sets need no embedder: their copies in the pool are found by model-free copy detection.
Seeds (retrieval) need one; without --embedder a small `tiny` model is first trained on the
pool (hash-deduplicated) under --out/bootstrap, for --bootstrap-steps steps, and used for
retrieval and clustering only: it proposes copy candidates but never decides what is a copy.
Parameters are all checked before any work starts. OUT records its inputs and settings
(OUT/run.json) and is locked while the pipeline runs (OUT/.lock): another run into it is
refused unless --extend (add inputs to the curation; pretraining resumes from its last
checkpoint) or --overwrite (delete run/, pretrain/, hf/, bootstrap/ and start over).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lvd.cli.checks import error, flow_failure, folder_refusal, problems, quiet_console_tracebacks, refuse
from lvd.cli.curate import prepare_prefect_env
from lvd.cli.options import (
    add_copy_options,
    add_curate_options,
    add_dump_options,
    add_hygiene_options,
    add_run_folder_options,
    add_scale_options,
    add_selection_options,
    add_training_options,
    copy_kwargs,
    flow_kwargs,
    hygiene_kwargs,
    hygiene_problems,
    run_mode,
    selection_kwargs,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="curate -> pretrain -> k-NN eval -> export, as one Prefect flow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dump_options(p)
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder: run/, pretrain/, hf/ (reused to resume curation)"
    )
    p.add_argument(
        "--bootstrap-steps",
        type=int,
        default=100,
        metavar="N",
        help="training steps of the bootstrap embedder, trained on the pool when --seeds "
        "or --target-size come without --embedder (default 100)",
    )
    p.add_argument(
        "--knn-train",
        default=None,
        metavar="DIR",
        help="labelled training images DIR/<class>/*.png for k-NN eval (with --knn-val)",
    )
    p.add_argument(
        "--knn-val",
        default=None,
        metavar="DIR",
        help="labelled validation images DIR/<class>/*.png for k-NN eval (with --knn-train)",
    )
    add_selection_options(p)
    add_copy_options(p)
    add_hygiene_options(p)
    add_training_options(p, max_steps=None)
    add_curate_options(p)
    add_scale_options(p)
    add_run_folder_options(p)
    p.set_defaults(func=main, check=check)


def pipeline_params(
    args: argparse.Namespace,
    *,
    inputs: list[str],
    out: Path,
    knn_train: str | None,
    knn_val: str | None,
    seeds=(),
    eval_sets=(),
    bootstrap_steps: int = 100,
) -> dict:
    """The `pipeline` flow's parameters from the command's arguments."""
    curate_kw = flow_kwargs(args)
    embedder = curate_kw.pop("embedder")
    if hasattr(args, "retrieval"):  # `lvd pipeline` (the demo has no selection options)
        selection = selection_kwargs(args)
        del selection["seeds"], selection["eval_sets"]  # pipeline parameters of their own
        curate_kw.update(selection)
        curate_kw.update(copy_kwargs(args))
        curate_kw.update(hygiene_kwargs(args))
    if getattr(args, "worker_memory", None):
        curate_kw["worker_memory"] = args.worker_memory
    return dict(
        inputs=[str(i) for i in inputs],
        out=str(out),
        recipe=args.recipe,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seeds=list(seeds),
        eval_sets=list(eval_sets),
        embedder=embedder,
        bootstrap_steps=bootstrap_steps,
        knn_train=knn_train,
        knn_val=knn_val,
        knn_k=args.knn_k,
        curate_options=curate_kw,
        nproc_per_node=args.nproc_per_node,
        mode=run_mode(args),
    )


def precheck(params: dict) -> int:
    """The OUT folder (lvd.runfolder), before Prefect and Ray; 0 when it may be claimed."""
    from lvd import runfolder

    try:
        runfolder.precheck(
            params["out"],
            params["inputs"],
            runfolder.pipeline_settings(params),
            params["mode"],
            outputs=runfolder.PIPELINE_OUTPUTS,
        )
    except runfolder.RunFolderError as e:
        return folder_refusal(e)
    return 0


def check(args: argparse.Namespace) -> int:
    if found := problems(args, "pipeline") + hygiene_problems(args):
        return refuse(found)
    return precheck(_params(args))


def run_pipeline(args: argparse.Namespace, **sources) -> int:
    """Run the flow, print the accounting and results; 0 when everything holds. `sources`:
    `pipeline_params`'s keywords (inputs, out, knn folders, seeds, eval sets, bootstrap steps)."""
    params = pipeline_params(args, **sources)
    where = prepare_prefect_env()
    from lvd import runfolder
    from lvd.curation import rundir, runner
    from lvd.curation.ledger import format_report, verify_run

    try:  # a refused join is one line, before the flow starts
        runner.init_ray(params["curate_options"]["ray_address"])
    except runner.RayJoinError as e:
        error(str(e))
        return 2
    from lvd.flows.pipeline import pipeline

    quiet_console_tracebacks()  # failures end in one `error:` line, not Prefect's tracebacks
    try:
        s = pipeline(**params)
    except Exception as e:  # refused folder or parameters, a guard, no shards, disk full: one line
        if (code := flow_failure(e, params["out"])) is None:
            raise
        return code
    finally:
        runfolder.release_all()
    report = verify_run(Path(s.curate.run_dir))
    print(format_report(report))
    p = s.pretrain
    print(
        f"pretrained `{p.recipe}` steps {p.start_step}..{p.end_step}, last loss "
        f"{'-' if p.last_loss is None else f'{p.last_loss:.4f}'}; checkpoint {p.checkpoint}"
    )
    if p.knn_top1 is not None:
        print(f"k-NN top-1 of the teacher: {100 * p.knn_top1:.2f}%")
    print(f"Hugging Face model folder: {s.hf_dir}")
    print(f"run folder: {s.curate.run_dir}  (ledger: {rundir.ledger_path(s.curate.run_dir)})")
    print(f"check it again any time with: lvd verify {s.curate.run_dir}")
    print(where)
    return 0 if report.ok else 1


def _sources(args: argparse.Namespace) -> dict:
    """`pipeline_params`'s keywords from `lvd pipeline`'s own arguments."""
    return dict(
        inputs=args.input,
        out=Path(args.out).resolve(),
        knn_train=args.knn_train,
        knn_val=args.knn_val,
        seeds=args.seeds,
        eval_sets=args.eval_sets,
        bootstrap_steps=args.bootstrap_steps,
    )


def _params(args: argparse.Namespace) -> dict:
    return pipeline_params(args, **_sources(args))


def main(args: argparse.Namespace) -> int:
    return run_pipeline(args, **_sources(args))
