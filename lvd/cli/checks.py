"""Checks of `lvd curate`, `lvd pipeline` and `lvd demo` before Prefect or Ray start, and the
one-line messages of failures that come later (disk full).

`check(args)` (run by `lvd.cli.main.main` before anything else: no Prefect, no Ray, no
folder created) prints one `error:` line and returns 2 for parameters that cannot work
(a missing input, an `--out` that is a file, an unknown `--embedder` / `--copy-model` path, a
number out of range), and refuses a run folder that holds another run or is locked by
another process (`lvd.runfolder.precheck`). The flows check again (`lvd.flows.pipeline.validate`,
`curate`'s own checks, `runfolder.claim`) for callers that do not come through here.

`disk_full(exc, out)`: the `error: disk full writing PATH during STAGE` line for an OSError
ENOSPC anywhere in `exc`'s chain (a Ray task's error keeps it as `cause`), else None.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

NO_EMBEDDER = (
    "{what} need(s) image embeddings: pass --embedder (an lvd checkpoint, an official "
    "DINOv2 .pth file or a local Hugging Face Dinov2 folder), or run `lvd pipeline`, which "
    "pretrains a small bootstrap embedder on the pool when none is given"
)


def _missing(paths, flag: str) -> list[str]:
    out = []
    for p in paths or []:
        s = str(p)
        if "://" in s or "::" in s:
            continue  # a URI: the source reader says what is wrong with it
        if os.path.lexists(s) and not os.path.exists(s):
            out.append(f"{flag} {s}: a broken symlink or a symlink loop")
        elif not os.path.exists(s):
            out.append(f"{flag} {s}: no such file or folder")
    return out


def _out_problem(out: str | Path) -> list[str]:
    path = Path(out).expanduser().absolute()
    for p in (path, *path.parents):  # the nearest part of --out that exists
        if p.exists():
            if not p.is_dir():
                return [f"--out {out}: {'it' if p == path else p} is a file, not a folder"]
            return [] if os.access(p, os.W_OK | os.X_OK) else [f"--out {out}: {p} is not writable"]
    return []


def problems(args: argparse.Namespace, command: str) -> list[str]:
    """Every problem with the arguments of `command` (curate, pipeline, demo); no side effects."""
    found: list[str] = []
    if command != "demo":
        inputs = [str(i) for i in args.input or []]
        found += _missing(inputs, "--input")
        if twice := sorted({i for i in inputs if inputs.count(i) > 1}):
            found.append(f"--input given more than once (each input must count once): {', '.join(twice)}")
        found += _missing(args.seeds, "--seeds") + _missing(args.eval_sets, "--eval-sets")
    found += _out_problem(args.out)
    for flag, spec in (("--embedder", args.embedder), ("--copy-model", getattr(args, "copy_model", None))):
        if spec is not None:
            found += [
                m.replace("no such file or folder", "no such model file or folder") for m in _missing([spec], flag)
            ]
    for flag, value, low in (
        ("--partition-size", args.partition_size, 1),
        ("--shard-size", args.shard_size, 1),
        ("--min-side", args.min_side, 1),
        ("--max-pixels", args.max_pixels, 1),
        ("--max-bytes", args.max_bytes, 1),
        ("--max-decoded-bytes", args.max_decoded_bytes, 1),
        ("--max-retries", args.max_retries, 0),
    ):
        if value is not None and value < low:
            found.append(f"{flag} {value}: use at least {low}")
    for d in args.allow_root or []:
        if not Path(d).is_dir():
            found.append(f"--allow-root {d}: not a folder")
    if hasattr(args, "copy_model"):  # curate and pipeline: selection and copy options
        f = args.max_remove_fraction
        if f is not None and not 0 < f <= 1:
            found.append(f"--max-remove-fraction {f}: use a fraction in (0, 1]")
        r = args.copy_false_link_rate
        if r is not None and not 0 < r < 1:
            found.append(f"--copy-false-link-rate {r}: use a fraction in (0, 1)")
        if args.eval_sets and args.no_copy_detection:
            found.append(
                "--eval-sets: decontamination is copy detection against the eval images; drop --no-copy-detection"
            )
        if args.copy_model and args.no_copy_detection:
            found.append("--copy-model is for copy detection; drop --no-copy-detection")
        if args.retrieval == "hierarchical" and args.target_size is None:
            found.append("--retrieval hierarchical samples the pool to a size: pass --target-size N")
        for flag, value in (
            ("--target-size", args.target_size),
            ("--clusters", args.clusters),
            ("--copy-candidates", args.copy_candidates),
        ):
            if value is not None and value < 1:
                found.append(f"{flag} {value}: use at least 1")
    if command == "curate":
        needs = [w for w, on in (("--seeds", args.seeds), ("--target-size", args.target_size is not None)) if on]
        if needs and not args.embedder:
            found.append(NO_EMBEDDER.format(what=", ".join(needs)))
    if command in ("pipeline", "demo"):
        from lvd.pretrain.recipes import RECIPES

        if args.recipe not in RECIPES:
            found.append(f"unknown recipe {args.recipe!r}: use one of {', '.join(sorted(RECIPES))}")
        for flag, value in (
            ("--max-steps", args.max_steps),
            ("--batch-size", args.batch_size),
            ("--nproc-per-node", args.nproc_per_node),
            ("--bootstrap-steps", getattr(args, "bootstrap_steps", None)),
        ):
            if value is not None and value < 1:
                found.append(f"{flag} {value}: use at least 1")
    if command == "pipeline":
        if (args.knn_train is None) != (args.knn_val is None):
            found.append("k-NN evaluation needs both --knn-train and --knn-val (labelled DIR/<class>/*.png)")
        for flag, d in (("--knn-train", args.knn_train), ("--knn-val", args.knn_val)):
            if d is not None and not Path(d).is_dir():
                found.append(f"{flag} {d}: not a folder of class sub-folders")
    return found


def error(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def refuse(found: list[str]) -> int:
    error("; ".join(found))
    return 2


def flow_failure(e: BaseException, out: str | Path) -> int | None:
    """Print a failed flow's one `error:` line and return the exit code; None when `e` is not
    one we know (the caller re-raises it). A refused folder: 1 if busy, else 2; refused
    parameters (ValueError): 2; a full disk (with path and stage), a guard's refusal or a stage
    with nothing to go on (RuntimeError): 1."""
    from lvd.runfolder import RunFolderError

    if isinstance(e, RunFolderError):
        return folder_refusal(e)
    if isinstance(e, ValueError):
        error(str(e))
        return 2
    if (full := disk_full(e, out)) is not None:
        error(full)
        return 1
    if isinstance(e, RuntimeError):
        error(str(e))
        return 1
    return None


def folder_refusal(e: Exception) -> int:
    """Exit code of a run folder refusal: 1 when another process holds it, else 2 (usage)."""
    from lvd.runfolder import RunFolderBusy

    error(str(e))
    return 1 if isinstance(e, RunFolderBusy) else 2


# ---------------------------------------------------------------- disk full


def _chain(exc: BaseException):
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def find_enospc(exc: BaseException) -> BaseException | None:
    """The ENOSPC error in `exc`'s chain: an OSError with errno ENOSPC, else an error whose
    text says so (Arrow's writers put the errno in the message), else None."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
    for e in chain:
        if "[Errno 28]" in str(e) or "No space left on device" in str(e):
            return e
    return None


def _stage_task(exc: BaseException) -> str | None:
    """The innermost Prefect task the error came through (its name, e.g. `ingest`)."""
    name = None
    for e in _chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            obj = frame.f_globals.get(frame.f_code.co_name)
            if (
                type(obj).__name__ == "Task"
                and hasattr(obj, "name")
                and frame.f_globals.get("__name__", "").startswith("lvd.")
            ):
                name = obj.name
        if name:
            return name
    return None


def disk_full(exc: BaseException, out: str | Path) -> str | None:
    """`disk full writing PATH during STAGE (N free on PATH's disk)`, or None when `exc` is not ENOSPC."""
    err = find_enospc(exc)
    if err is None:
        return None
    out = Path(out).resolve()
    path = getattr(err, "filename", None)
    path = Path(path) if path else None
    stage = _stage_task(exc)
    if stage is None and path is not None:
        try:
            stage = path.resolve().relative_to(out).parts[0]
        except (ValueError, IndexError):
            stage = None
    where = path or out
    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
        room = f" ({free // 1024} KiB free there)"
    except (OSError, StopIteration):
        room = ""
    return (
        f"disk full writing {where} during {stage or 'the run'}{room}: free space (or pick another "
        "--out) and run the same command again to resume"
    )


# ---------------------------------------------------------------- terminal logs


class ShortConsoleFormatter:
    """Wraps a console handler's formatter: no traceback, one line of at most `MAX` characters
    (a failed task's state is a whole Ray traceback in one repr). Only the terminal is
    shortened: the Prefect API handler formats the same record in full for the UI."""

    MAX = 240

    def __init__(self, inner: logging.Formatter) -> None:
        self.inner = inner

    def format(self, record) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        first = text.splitlines()[0] if text else text
        if len(first) > self.MAX or saved[0] is not None:
            first = first[: self.MAX] + " ... (in full in the Prefect UI)"
        return first

    def __getattr__(self, name):
        return getattr(self.inner, name)


def quiet_console_tracebacks() -> None:
    """Prefect's terminal log lines without tracebacks (the command prints one `error:` line)."""
    import logging

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in lg.handlers:
            if (
                isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)
                and not isinstance(h.formatter, ShortConsoleFormatter)
            ):
                h.setFormatter(ShortConsoleFormatter(h.formatter or logging.Formatter()))
