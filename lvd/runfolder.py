"""Who owns a run folder: its inputs and settings (`RUN/run.json`) and an exclusive lock (`RUN/.lock`).

The model is img2dataset's incremental modes. A run folder records, when a run first claims
it, what went in:
- `inputs`: the resolved input paths (URIs as given), in the order of the first run. The
  identity is the set of paths, not their content: a rerun after files changed inside an
  input is a resume, and the partition fingerprints in the done-markers (stat-based: name,
  size, mtime) redo what changed. `input_stat` (a digest of each top-level input's size and
  mtime) is recorded for the eye only.
- `settings`: the flow parameters that change outputs (not where it runs: Ray address,
  retries; not the guard's refusal limit), normalised so `lvd curate` and a Python call
  with the same meaning agree.

`claim(run_dir, inputs, settings, mode)`:
- `resume` (default): the same inputs (any order; the recorded order is used) and settings
  go on; other inputs or settings are refused with one line naming what differs. A folder
  with no `run.json` is claimed (a new folder, or a run of an lvd without this module).
- `extend`: the given inputs are added to the recorded ones (which must all still exist;
  giving them again is fine); the settings must match.
- `overwrite`: the run's outputs are deleted (`outputs`: the names to delete; default all
  but the lock), then the folder is claimed afresh. A non-empty folder that holds neither
  `run.json` nor an lvd run (`ingest/`, `ledger/`, `ledger.parquet`) is refused, never wiped.
The lock is `fcntl.flock` on `RUN/.lock` (pid, host, start time inside): a second process is
refused with "another lvd run (pid N, started T) holds RUN"; the OS releases it when the
holder exits or is killed. In one process claims nest (the pipeline claims OUT, its curate
subflows OUT/run): a folder this process already holds is claimed again without a second
flock. `claim` is a context manager; it also holds on without `with` (a flow that cannot
wrap its body) until `release_all()` or the process ends.

`precheck(...)` is the same decision without creating or writing anything (the command
line's fast refusal before Prefect and Ray start).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

RECORD = "run.json"
LOCK = ".lock"
MODES = ("resume", "extend", "overwrite")
FORMAT = "lvd-run-folder"
LVD_RUN_MARKS = ("ingest", "ledger", "ledger.parquet", RECORD)
PIPELINE_RUN = "run"  # an `lvd pipeline --out` folder's curated run folder (what `lvd verify` checks in it)
PIPELINE_OUTPUTS = (PIPELINE_RUN, "pretrain", "hf", "bootstrap")  # what `lvd pipeline --overwrite` deletes


class RunFolderError(ValueError):
    """A run folder refused: other inputs or settings, or not ours to wipe (one line)."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock."""


@dataclass
class Claim:
    run_dir: Path
    inputs: list[str]  # what the run goes on with: recorded order, then added inputs
    mode: str
    action: str  # created | resumed | extended | overwritten | adopted
    added: list[str] = field(default_factory=list)


# resolved run folder -> (open lock file, nesting depth): the locks this process holds
_HELD: dict[str, list] = {}


def resolve_input(uri: str) -> str:
    """A local path resolved (symlinks, relative to the cwd); a URI as given."""
    s = str(uri)
    if "://" in s or "::" in s:
        return s
    return str(Path(s).expanduser().resolve())


def _exists(uri: str) -> bool:
    return "://" in uri or "::" in uri or Path(uri).exists()


def input_stat(inputs: list[str]) -> str:
    """Digest of each local top-level input's size and mtime (informational)."""
    h = hashlib.sha256()
    for uri in inputs:
        try:
            st = os.stat(uri)
            h.update(f"{uri}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{uri}\0-\n".encode())
    return h.hexdigest()


def normalise(value):
    """JSON form of a settings value: tuples as lists, sorted keys, paths as strings."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: unreadable run record ({e}); move it aside or pass --overwrite") from e


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def settings_diff(recorded: dict, given: dict, limit: int = 4) -> list[str]:
    a, b = _flat(recorded), _flat(given)
    diffs = [
        f"{k} {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    return diffs[:limit] + ([f"and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _short(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def decide(run_dir: Path, record: dict | None, inputs: list[str], settings: dict, mode: str) -> Claim:
    """What a claim does, or RunFolderError saying why not. Nothing is written here."""
    if mode not in MODES:
        raise ValueError(f"run folder mode {mode!r}: use one of {', '.join(MODES)}")
    inputs = list(dict.fromkeys(resolve_input(i) for i in inputs))
    settings = normalise(settings)
    if mode == "overwrite":
        return Claim(run_dir, inputs, mode, "overwritten" if _has_content(run_dir) else "created")
    if record is None:
        return Claim(run_dir, inputs, mode, "adopted" if _has_content(run_dir) else "created")
    where = str(run_dir)
    if record.get("settings") != settings:
        diff = "; ".join(settings_diff(record.get("settings") or {}, settings))
        raise RunFolderError(
            f"{where} holds a run with other settings ({diff}): pass --overwrite to start it over, or another --out"
        )
    recorded = list(record.get("inputs") or [])
    new = [i for i in inputs if i not in recorded]
    dropped = [i for i in recorded if i not in inputs]
    if mode == "extend":
        gone = [i for i in recorded if not _exists(i)]
        if gone:
            raise RunFolderError(
                f"--extend {where}: earlier input(s) no longer exist: {_short(gone)}; "
                "restore them, or pass --overwrite to start over"
            )
        return Claim(run_dir, recorded + new, mode, "extended" if new else "resumed", added=new)
    if new or dropped:
        what = "; ".join(
            x
            for x in (f"not given now: {_short(dropped)}" if dropped else "", f"new: {_short(new)}" if new else "")
            if x
        )
        raise RunFolderError(
            f"{where} holds a run of other inputs ({what}): pass --extend to add "
            "inputs, --overwrite to start over, or another --out"
        )
    return Claim(run_dir, recorded, mode, "resumed")


def _has_content(run_dir: Path) -> bool:
    try:
        return any(p.name != LOCK for p in Path(run_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def holder(run_dir: Path) -> str:
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"


def _busy(run_dir: Path) -> RunFolderBusy:
    return RunFolderBusy(f"another lvd run ({holder(run_dir)}) holds {run_dir}")


def _lock(run_dir: Path) -> None:
    key = str(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(run_dir) from None
        raise
    info = dict(
        pid=os.getpid(), host=socket.gethostname(), started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = [fd, 1]


def _unlock(run_dir: Path) -> None:
    held = _HELD.get(str(run_dir))
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[str(run_dir)]
        os.close(held[0])  # closing the descriptor releases the flock


def release_all() -> None:
    """Release every run folder lock this process holds (the command line calls it on exit)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key)[0])


def held() -> list[str]:
    return sorted(_HELD)


def precheck(
    run_dir: str | Path,
    inputs: list[str],
    settings: dict,
    mode: str = "resume",
    *,
    outputs: tuple[str, ...] | None = None,
) -> Claim:
    """`claim`'s refusals without creating or writing anything (lock tested, not kept)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} exists and is not a folder")
    if str(run_dir) not in _HELD and (run_dir / LOCK).exists():
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir) from None
        finally:
            os.close(fd)  # releases the test lock too
    claim = decide(run_dir, read_record(run_dir), inputs, settings, mode)
    if mode == "overwrite":
        _check_wipe(run_dir, outputs)
    return claim


def _check_wipe(run_dir: Path, outputs: tuple[str, ...] | None = None) -> None:
    if outputs is None and _has_content(run_dir) and not any((run_dir / m).exists() for m in LVD_RUN_MARKS):
        raise RunFolderError(
            f"--overwrite {run_dir}: not an lvd run folder (no {RECORD}, ingest/, ledger/ or "
            "ledger.parquet) and not empty: refusing to delete it; use an empty or new --out"
        )


def _wipe(run_dir: Path, outputs: tuple[str, ...] | None) -> None:
    _check_wipe(run_dir, outputs)
    names = [p.name for p in run_dir.iterdir()] if outputs is None else [*outputs, RECORD]
    for name in names:
        p = run_dir / name
        if name == LOCK or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


class claim:  # noqa: N801 - used like a function returning a context manager
    """Claim `run_dir` for a run of `inputs` with `settings` (module doc). The lock is taken
    and the record written on creation; leaving the `with` block releases the lock."""

    def __init__(
        self,
        run_dir: str | Path,
        inputs: list[str],
        settings: dict,
        mode: str = "resume",
        *,
        outputs: tuple[str, ...] | None = None,
        kind: str = "curate",
    ) -> None:
        from lvd import durable

        run_dir = Path(run_dir).resolve()
        if run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"{run_dir} exists and is not a folder")
        _lock(run_dir)
        try:
            record = read_record(run_dir)
            self.claim = c = decide(run_dir, record, inputs, settings, mode)
            if mode == "overwrite":
                _wipe(run_dir, outputs)
                record = None
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            entry = dict(at=now, mode=mode, action=c.action, pid=os.getpid(), host=socket.gethostname())
            if c.added:
                entry["added"] = c.added
            if record is None or c.added or c.action != "resumed":
                record = dict(
                    format=FORMAT,
                    version=1,
                    kind=kind,
                    created=(record or {}).get("created", now),
                    inputs=c.inputs,
                    input_stat=input_stat(c.inputs),
                    settings=normalise(settings),
                    history=[*(record or {}).get("history", []), entry][-50:],
                )
                durable.write_bytes(run_dir / RECORD, json.dumps(record, indent=1).encode())
        except BaseException:
            _unlock(run_dir)
            raise
        self.run_dir, self.inputs, self.action = run_dir, c.inputs, c.action

    def release(self) -> None:
        _unlock(self.run_dir)

    def __enter__(self) -> claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- what counts as settings

# Flow parameters that do not change outputs: where and how robustly it runs, the guard's limit
# (a refused run wrote nothing), training length (more steps is a resume), data loading.
# worker_memory sizes partitions only (the partitioned stages equal the one-process ones)
CURATE_IGNORED = ("inputs", "out", "mode", "max_retries", "ray_address", "max_remove_fraction", "worker_memory")
# The `curate` flow's defaults that are not None (a caller passing fewer parameters means
# these); tests/security/test_rundir.py checks them against the flow's signature.
CURATE_DEFAULTS = dict(partition_size=256, retrieval="sample", shard_size=1000, copy_detection=True)
PIPELINE_IGNORED = ("inputs", "out", "mode", "max_steps", "num_workers")


def _paths(values) -> list[str]:
    return [resolve_input(v) for v in values or []]


def curate_settings(params: dict) -> dict:
    """The `curate` flow's parameters that change outputs, normalised: ingest and dedup through
    their configs (a command line that spells out every default and a call that passes none
    agree), empty option dicts as {}, paths resolved."""
    from dataclasses import asdict

    from lvd.curation.dedup import DedupConfig
    from lvd.curation.ingest import IngestConfig

    out = {**CURATE_DEFAULTS, **{k: v for k, v in params.items() if k not in CURATE_IGNORED}}
    out["ingest"] = asdict(IngestConfig(**(out.get("ingest") or {})))
    out["dedup"] = asdict(DedupConfig(**(out.get("dedup") or {})))
    for key in ("seeds", "eval_sets"):
        out[key] = _paths(out.get(key))
    for key in ("embedder", "copy_model", "vectors"):
        if out.get(key):
            out[key] = resolve_input(out[key])
    for key in ("embed", "copydetect", "cluster", "retrieve", "shard"):
        out[key] = dict(out.get(key) or {})
    return normalise({k: v for k, v in out.items() if v is not None})  # None: not given


def pipeline_settings(params: dict) -> dict:
    """The `pipeline` flow's parameters that change outputs (curate options as `curate_settings`)."""
    out = {k: v for k, v in params.items() if k not in PIPELINE_IGNORED}
    out["curate_options"] = curate_settings(dict(out.get("curate_options") or {}))
    for key in ("seeds", "eval_sets"):
        out[key] = _paths(out.get(key))
    for key in ("embedder", "knn_train", "knn_val"):
        if out.get(key):
            out[key] = resolve_input(out[key])
    return normalise({k: v for k, v in out.items() if v is not None})
