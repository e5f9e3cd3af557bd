"""Multi-rank training for the `pretrain` flow: `lvd pretrain --nproc-per-node N` as a child
process, followed, and relaunched with `--resume` when it dies.

The command line is the stable interface to the launcher (the elastic launcher or torchrun
behind `--nproc-per-node`), so the flow starts exactly what an operator would type. When a
rank dies the launcher stops the other ranks and exits non-zero; `launch_with_relaunches`
then resumes from the latest complete checkpoint, at most `max_relaunches` times. A failure
that would only repeat (bad settings or inputs, a resume mismatch, a non-finite loss, out of
memory: `lvd.pretrain.failures.repeats`) exits with `EXIT_REPEATS` and is not relaunched: the
decision is the exit code, never the wording of a log.
Each attempt's output goes to OUT/launch-<attempt>.log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lvd.pretrain.failures import EXIT_REPEATS

POLL_S = 1.0
TAIL_CHARS = 4000
STOP_GRACE_S = 30.0


@dataclass(frozen=True, kw_only=True)
class RanksCommand:
    """The `lvd pretrain` flags of one multi-rank run (only flags the CLI has)."""

    shards: tuple[str, ...]
    recipe: str
    out: Path
    nproc_per_node: int
    max_steps: int | None = None
    batch_size: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str | None = None
    deterministic: bool = False
    config: str | None = None  # --config FILE
    sets: tuple[str, ...] = ()  # each a --set SECTION.FIELD=VALUE
    init: str | None = None
    distill_from: str | None = None

    def __post_init__(self) -> None:
        if self.nproc_per_node < 2:
            raise ValueError(
                f"nproc_per_node {self.nproc_per_node}: a launch is for 2 or more "
                "ranks; one process trains in the flow's own task"
            )

    def command(self, *, resume: bool) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "lvd.cli",
            "pretrain",
            "--shards",
            *self.shards,
            "--recipe",
            self.recipe,
            "--out",
            str(self.out),
            "--num-workers",
            str(self.num_workers),
            "--seed",
            str(self.seed),
            "--nproc-per-node",
            str(self.nproc_per_node),
        ]
        for flag, value in (
            ("--max-steps", self.max_steps),
            ("--batch-size", self.batch_size),
            ("--device", self.device),
            ("--config", self.config),
            ("--init", self.init),
            ("--distill-from", self.distill_from),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        for setting in self.sets:
            cmd += ["--set", setting]
        return cmd + ["--deterministic"] * self.deterministic + ["--resume"] * resume


@dataclass(frozen=True)
class LaunchOutcome:
    relaunches: int
    logs: tuple[Path, ...]


class LaunchFailed(RuntimeError):
    """Every attempt failed, or one failed in a way a relaunch would repeat."""


def log_path(out: Path, attempt: int) -> Path:
    return out / f"launch-{attempt}.log"


def log_tail(path: Path, chars: int | None = TAIL_CHARS) -> str:
    """The last `chars` characters of a log (all of it for None)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if chars is None else text[-chars:]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # nobody left in the group
        os.killpg(pgid, sig)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (the launcher and its ranks), then SIGKILL; and
    SIGKILL whatever of the group outlived the launcher, so that no rank of a failed attempt
    still writes into OUT while the next one trains."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)


def run_attempt(spec: RanksCommand, attempt: int, *, resume: bool, on_poll: Callable[[], None]) -> int:
    """One launch; `on_poll` runs every POLL_S seconds while it trains. Its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # logs as they happen, not at exit
    with log_path(spec.out, attempt).open("w") as log:
        log.write("$ " + " ".join(spec.command(resume=resume)) + "\n")
        log.flush()
        # its own session: stopping the flow stops the launcher and every rank
        proc = subprocess.Popen(
            spec.command(resume=resume), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                on_poll()
        finally:
            _stop(proc)
    on_poll()
    return proc.returncode


def launch_with_relaunches(
    spec: RanksCommand,
    *,
    resume: bool,
    max_relaunches: int,
    on_poll: Callable[[], None],
    before_relaunch: Callable[[int, int], None],
) -> LaunchOutcome:
    """Run until an attempt exits 0; relaunch with --resume after a failure, at most
    `max_relaunches` times. `before_relaunch(attempt, exit_code)` runs before each relaunch
    (the flow logs there and trims its view of the metrics)."""
    if max_relaunches < 0:
        raise ValueError(f"max_relaunches must be >= 0, got {max_relaunches}")
    spec.out.mkdir(parents=True, exist_ok=True)
    logs: list[Path] = []
    for attempt in range(1, max_relaunches + 2):
        logs.append(log_path(spec.out, attempt))
        code = run_attempt(spec, attempt, resume=resume or attempt > 1, on_poll=on_poll)
        if code == 0:
            return LaunchOutcome(relaunches=attempt - 1, logs=tuple(logs))
        tail = log_tail(logs[-1])
        if code == EXIT_REPEATS:
            raise LaunchFailed(
                f"pretrain on {spec.nproc_per_node} ranks stopped on a failure a relaunch would repeat "
                f"(exit code {code}); not relaunched after {attempt - 1} relaunch(es). "
                f"Log {logs[-1]}, its end:\n{tail}"
            )
        if attempt > max_relaunches:
            break
        before_relaunch(attempt, code)
    raise LaunchFailed(
        f"pretrain on {spec.nproc_per_node} ranks failed after {max_relaunches} relaunch(es) "
        f"(last exit code {code}); logs: {', '.join(map(str, logs))}. End of {logs[-1]}:\n"
        f"{log_tail(logs[-1])}"
    )
