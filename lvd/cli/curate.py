"""`lvd curate`: run the Prefect flow `curate` over input dumps.

Stages: ingest, hash dedup, copy detection (model-free: hashes and k-NN propose candidates,
ORB local features with geometric verification decide, at a threshold calibrated on known
copies of the pool's own images), decontamination against --eval-sets (the same detector),
then with --embedder: embedding, clustering and retrieval (with --seeds or --target-size);
then WebDataset shards (RUN/shards) and the ledger. Without --seeds and --target-size every
image that is not rejected, a duplicate, a copy or contaminated is sharded. Pool hygiene (URL
lists and a per-domain cap, quality filters, an NSFW model, face blurring) is off unless its
options are given. Seeds and a target
size need an embedder; an embedder also proposes copy candidates (it never decides).

A stage that would remove more than --max-remove-fraction of its input stops the run before
the ledger changes, shows its largest groups, and leaves the run folder as it was.

Where it runs: Ray joins `--ray-address` or `RAY_ADDRESS` when given, else starts
locally with every CPU. On a cluster every node must see the inputs and the run folder at
the same paths (a shared filesystem): Ray tasks read inputs and write partition files.

Prefect talks to `PREFECT_API_URL` when set; otherwise Prefect 3 starts a temporary local
server on a database in `PREFECT_HOME`, which lvd defaults to `~/.lvd/prefect` (one place
for every run, so `PREFECT_HOME=~/.lvd/prefect prefect server start` shows them all).

A run folder is resumable: run the same command again after a crash or kill and done
partitions (those with a done-marker matching input and config) are skipped. The folder
records its inputs and settings (RUN/run.json) and is locked while a run works in it
(RUN/.lock): another run into it with other inputs or settings is refused unless
--extend (add inputs) or --overwrite (start over); a second run at the same time is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lvd.cli.checks import error, flow_failure, folder_refusal, problems, quiet_console_tracebacks, refuse
from lvd.cli.options import (
    add_copy_options,
    add_curate_options,
    add_dump_options,
    add_hygiene_options,
    add_run_folder_options,
    add_scale_options,
    add_selection_options,
    curate_kwargs,
    hygiene_problems,
)

DEFAULT_PREFECT_HOME = Path("~/.lvd/prefect")


def prepare_prefect_env() -> str:
    """Pick PREFECT_HOME before Prefect is imported; returns a line saying where runs go."""
    # No telemetry unless the user turns it on (PREFECT_SERVER_ANALYTICS_ENABLED=true): the
    # temporary server would otherwise phone home on every run (an ERROR line when offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect server: {os.environ['PREFECT_API_URL']}"
    home = os.environ.setdefault("PREFECT_HOME", str(DEFAULT_PREFECT_HOME.expanduser()))
    Path(home).mkdir(parents=True, exist_ok=True)
    # The temporary server migrates a new database on first start: on a busy 2-core machine
    # that takes longer than Prefect's 20 s default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The prefect script next to this Python: `prefect` alone is not on PATH in a venv
    # that is not activated (the README's `.venv/bin/lvd demo`).
    prefect = Path(sys.executable).parent / "prefect"
    return (
        f"Prefect runs are stored in {home}; to browse them run:\n"
        f"  PREFECT_HOME={home} {prefect} server start   # then open http://127.0.0.1:4200"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "curate",
        help="curate image dumps into a run folder (ingest, dedup, ledger)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dump_options(p)
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (reused to resume)")
    add_selection_options(p)
    add_copy_options(p)
    add_hygiene_options(p)
    add_curate_options(p)
    add_scale_options(p)
    add_run_folder_options(p)
    p.set_defaults(func=main, check=check)


def run_curate(inputs: list[str], out: str, **kwargs) -> int:
    """Run the flow and print the accounting; 0 when every input is accounted for."""
    inputs = [str(i) for i in inputs]
    if twice := sorted({i for i in inputs if inputs.count(i) > 1}):
        print(f"error: --input given more than once (each input must count once): {', '.join(twice)}", file=sys.stderr)
        return 2
    where = prepare_prefect_env()
    from lvd import runfolder
    from lvd.curation import runner
    from lvd.curation.ledger import format_report, verify_run

    try:  # a refused join is one line, before the flow (and Prefect's logging of it) starts
        runner.init_ray(kwargs.get("ray_address"))
    except runner.RayJoinError as e:
        error(str(e))
        return 2
    from lvd.flows.curate import curate

    quiet_console_tracebacks()  # failures end in one `error:` line, not Prefect's tracebacks
    try:
        summary = curate(inputs=inputs, out=str(out), **kwargs)
    except Exception as e:  # refused folder or parameters, a guard's refusal (MassRemovalError), disk full
        if (code := flow_failure(e, out)) is None:
            raise
        return code
    finally:
        runfolder.release_all()
    report = verify_run(Path(out))
    print(format_report(report))
    for line in summary.hygiene:
        print(line)
    print(where)
    return 0 if report.ok else 1


def check(args: argparse.Namespace) -> int:
    """Before Prefect and Ray: the arguments, then the run folder (lvd.runfolder); 0 when fine."""
    if found := problems(args, "curate") + hygiene_problems(args):
        return refuse(found)
    from lvd import runfolder

    kw = curate_kwargs(args)
    try:
        runfolder.precheck(args.out, args.input, runfolder.curate_settings(kw), kw["mode"])
    except runfolder.RunFolderError as e:
        return folder_refusal(e)
    return 0


def main(args: argparse.Namespace) -> int:
    return run_curate(args.input, args.out, **curate_kwargs(args))
