"""Processes an `lvd` command starts die with it, and flow runs it leaves RUNNING end Crashed.

Killed with SIGKILL (or by the OOM killer) `lvd curate` runs no cleanup: Prefect's temporary
server, Ray's agents and workers are orphaned and linger (measured before this module: the
Prefect server 1.5 min, Ray agents 80 s), and the flow run stays RUNNING in Prefect forever.

`protect(command, out)` (called by `lvd.cli.main` for commands that start Ray or Prefect):
- starts a supervisor (`python -m lvd.flows.watchdog PID START`, its own session so a Ctrl-C
  in the terminal does not hit it) that snapshots the command's process tree every 0.5 s;
  when the command is gone, for whatever reason, it sends SIGTERM to every process of the
  last snapshot that is still the same process (pid and start time), and to their children,
  then SIGKILL after 5 s, then exits. Ray's own fate sharing (PR_SET_PDEATHSIG on GCS and
  raylet) does not reach the agents, workers or Prefect's server; this does.
- records the command in `PREFECT_HOME/lvd-processes/<pid>-<start>.json` (pid, start time,
  host, run folder), removed when the command exits normally;
- marks stale flow runs: a RUNNING `curate` / `pipeline` flow run whose run folder
  (`out` parameter) belongs to a recorded command of this host that is no longer alive is
  set Crashed through the Prefect client (only when such a dead record exists, so a normal
  start costs no Prefect call). Runs started by Prefect workers are never touched: they
  have no record here.
Linux only (it reads /proc); elsewhere `protect` does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FLOWS = ("curate", "pipeline")
POLL_S = 0.5
GRACE_S = 5.0


# ---------------------------------------------------------------- /proc


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def is_alive(pid: int, start: str | None) -> bool:
    return start is not None and start_time(pid) == start


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids of every process now (read from /proc)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(pid: int) -> list[int]:
    kids = children_map()
    out, stack = [], list(kids.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack += kids.get(p, [])
    return out


# ---------------------------------------------------------------- supervisor


def supervise(parent: int, parent_start: str) -> None:
    """Run until `parent` is gone, then end what it started (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    snapshot: dict[int, str] = {}
    while is_alive(parent, parent_start):
        snapshot = {p: s for p in descendants(parent) if p != me and (s := start_time(p))}
        time.sleep(POLL_S)
    victims = {p: s for p, s in snapshot.items() if is_alive(p, s)}
    for p in list(victims):  # orphans keep their own children: take those too
        victims.update({c: s for c in descendants(p) if c != me and (s := start_time(c))})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p, s in victims.items():
            if is_alive(p, s):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(is_alive(p, s) for p, s in victims.items()):
            time.sleep(0.1)


def start_supervisor() -> subprocess.Popen | None:
    if not sys.platform.startswith("linux") or (start := start_time(os.getpid())) is None:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "lvd.flows.watchdog", str(os.getpid()), start],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


# ---------------------------------------------------------------- records and stale flow runs


def registry() -> Path:
    home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    return Path(home).expanduser() / "lvd-processes"


def register(command: str, out: str | None) -> Path:
    from lvd import durable

    pid = os.getpid()
    entry = dict(
        pid=pid, start=start_time(pid), host=socket.gethostname(), command=command,
        out=str(Path(out).resolve()) if out else None, cwd=os.getcwd(),
        started_at=dt.datetime.now(dt.UTC).isoformat(),
    )  # fmt: skip
    folder = registry()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pid}-{entry['start']}.json"
    durable.write_bytes(path, json.dumps(entry).encode())
    atexit.register(lambda: path.unlink(missing_ok=True))  # a clean exit leaves no record
    return path


def _records() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(registry().glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def mark_stale_flow_runs(log=print) -> list[str]:
    """Set Crashed every RUNNING curate/pipeline flow run owned by a dead recorded command;
    returns their ids."""
    host = socket.gethostname()
    records = [(p, r) for p, r in _records() if r.get("host") == host and r.get("pid") != os.getpid()]
    dead = [(p, r) for p, r in records if not is_alive(r["pid"], r.get("start"))]
    if not dead:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )  # fmt: skip
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
        for run in runs:
            owner = _owner(run, records)
            if owner is None or is_alive(owner["pid"], owner.get("start")):
                continue
            msg = f"its lvd process {owner['pid']} on {owner['host']} died without ending it (killed?)"
            client.set_flow_run_state(run.id, Crashed(message=msg), force=True)
            log(f"marked the flow run {run.name!r} ({run.id}) of {owner['out']} Crashed: {msg}")
            marked.append(str(run.id))
    for path, _ in dead:
        path.unlink(missing_ok=True)
    return marked


def _owner(run, records) -> dict | None:
    """The recorded command that ran `run`: its run folder is the command's `--out` or inside
    it (`lvd demo`), and of those the latest started before the run."""
    out = (run.parameters or {}).get("out")
    begun = run.start_time or run.expected_start_time
    if not out or begun is None:
        return None
    best = None
    for _, r in records:
        folder = Path(r.get("cwd", "/"), out).resolve()
        if not r.get("out") or not (folder == Path(r["out"]) or Path(r["out"]) in folder.parents):
            continue
        if dt.datetime.fromisoformat(r["started_at"]) > begun + dt.timedelta(seconds=5):
            continue
        if best is None or r["started_at"] > best["started_at"]:
            best = r
    return best


def protect(command: str, out: str | None, *, flows: bool) -> None:
    """What `lvd.cli.main` calls for a command that starts Ray or Prefect (module doc)."""
    if not sys.platform.startswith("linux"):
        return
    start_supervisor()
    if flows:
        from lvd.cli.curate import prepare_prefect_env

        prepare_prefect_env()  # the same PREFECT_HOME / API the flow will use
        try:
            mark_stale_flow_runs()
        except Exception as e:  # never keep a run from starting over bookkeeping
            print(f"warning: could not check for stale flow runs: {e!r}", file=sys.stderr)
    register(command, out)


if __name__ == "__main__":
    supervise(int(sys.argv[1]), sys.argv[2])
