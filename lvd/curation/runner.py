"""Map a stage function over partitions with Ray tasks; done-markers make stages resumable.

Ray tasks live here; long-lived actors in `actor_runner`, which shares this module's plan /
done / report steps (`plan_stage`, `collect`); a partition whose worker keeps dying goes to
the stage's isolation policy (`isolate`). A stage function is a plain picklable
callable `fn(partition) -> dict[str, pa.Table]`; each returned table is written beside the
partition as `part-NNNNNN.parquet` (key "") or `part-NNNNNN.<key>.parquet`. The Ray task
writes its outputs itself so image bytes never travel back to the driver, and writes the
partition's done-marker JSON last. Every file goes through `lvd.durable.write_atomic` (unique
temp name, fsync, rename, fsync of the folder). A marker is the only proof a partition is
done: a worker killed mid-write leaves at most orphaned temp files. The marker records each
output's size and sha256; `is_done` checks sizes always (one stat: a truncated or replaced
output reruns its partition) and sha256 only with `RunnerConfig.verify_checksums` (it reads
every output again: on resume that is the whole dump's accepted bytes).

Worker deaths (a killed process, a lost node) are retried by Ray through `max_retries`;
exceptions raised by the stage function are not retried (they are bugs or bad config,
and per-item problems are already rows with a reason, never exceptions). A partition whose
worker still dies after the retries (an input that crashes the decoder or exhausts memory)
goes to the stage's isolation policy when it has one (`lvd.curation.isolate`: ingest runs
the partition's inputs one at a time and records the one that kills its worker as rejected,
reason `worker_died`); otherwise the stage fails.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import ray

from lvd import durable
from lvd.curation.rundir import BLOBS, MARKER_SUFFIX, blob_group_rows  # the layout, marker names included, is rundir's

# What Ray raises for a task whose worker process died (killed, crashed, out of memory, node
# lost) once its retries are spent; RayTaskError (an exception in the stage) is not one.
WORKER_DEATHS = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.NodeDiedError,
)
TMP_TAG = durable.TMP_TAG
GROUP_ROWS = 65_536  # rows per row group of a stage output (bounded reads by uid range)


class PartitionLike(Protocol):
    """What the runner needs of a partition (see `sources.Partition`)."""

    index: int
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class WholeStage:
    """The single unit of a global stage (dedup): its outputs are named `<stem>.parquet`."""

    fingerprint: str
    stem: str
    index: int = 0


StageFn = Callable[[Any], dict[str, pa.Table]]
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """How stage work is spread over Ray.

    max_retries: Ray retries of a task whose worker process or node died (not exceptions).
    max_in_flight: tasks submitted but not finished at once; bounds driver and object-store
        memory on big dumps. None means twice the cluster's CPUs.
    num_cpus: CPUs reserved per task.
    verify_checksums: on resume, also re-hash every output of a done partition against its
        marker's sha256 (sizes are always checked); off by default because it reads every
        output again.
    """

    max_retries: int = 3
    max_in_flight: int | None = None
    num_cpus: float = 1.0
    verify_checksums: bool = False

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries}: use 0 (no retries) or more")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight={self.max_in_flight}: use None or at least 1")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus={self.num_cpus}: reserve a positive number of CPUs")


@dataclass(frozen=True, kw_only=True)
class StageReport:
    """What one stage run did: partitions run now vs found done, and their markers."""

    stage_dir: Path
    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    markers: dict[int, dict] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.ran) + len(self.skipped)


def config_hash(*configs: Any) -> str:
    """A stable short hash of dataclass configs (or JSON-able values)."""
    payload = [asdict(c) if is_dataclass(c) else c for c in configs]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RayJoinError(ConnectionError, ValueError):
    """Joining a Ray cluster failed; the message is one line saying which token lvd sent."""


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local Ray; no-op if running.

    A local Ray listens on loopback only (GCS, raylet, workers, agents) and starts no
    dashboard unless `dashboard` (default: env LVD_RAY_DASHBOARD=1; then on 127.0.0.1).
    Joining authenticates as Ray's own CLI does: when RAY_AUTH_MODE is unset and a token is
    available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) token auth is
    switched on (a cluster without auth accepts it too). A failed join raises
    `RayJoinError` whose one-line message names the token source and the setting."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        token = use_cluster_token()
        host = address.split("://")[-1].rsplit(":", 1)[0]
        with _loopback_only(host in LOOPBACK):  # else Ray rewrites 127.0.0.1 to the LAN IP
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ray.exceptions.AuthenticationError) as e:
                raise RayJoinError(join_failure(address, token, e)) from e
        return
    if dashboard is None:
        dashboard = os.environ.get("LVD_RAY_DASHBOARD", "") in ("1", "true", "yes")
    # A local Ray sized to the machine (at least 1) without the dashboard keeps a
    # 2-core laptop responsive.
    num_cpus = num_cpus or max(1, os.cpu_count() or 1)
    with _loopback_only(True):
        # address="local": a new Ray of our own, never a cluster that happens to run on this
        # machine (ray.init() alone would join one started with `ray start`)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )


class _loopback_only:
    """While active, Ray takes 127.0.0.1 as this node's address: a local Ray then binds every
    server to loopback. This is Ray's own local-only switch (what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    sets at import on macOS/Windows), flipped for the `ray.init` call only, so a later join of
    a remote cluster from this process still finds the node's real address."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        from ray._private import ray_constants

        self.constants, self.before = ray_constants, getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
        if self.on:
            ray_constants.ENABLE_RAY_CLUSTER = False
        return self

    def __exit__(self, *exc) -> None:
        self.constants.ENABLE_RAY_CLUSTER = self.before


def token_source() -> str | None:
    """Where Ray's token loader would take a token from, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return path
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def use_cluster_token() -> str | None:
    """Switch on token auth for a join when RAY_AUTH_MODE is unset and a token exists (what
    `ray start --head` does); returns the token's source when token auth is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:  # a Ray without token auth
            return None
        if not maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
            return None
    elif mode.lower() != "token":
        return None
    return token_source() or "no token found"


def join_failure(address: str, token: str | None, error: BaseException | None = None) -> str:
    """One line: what lvd sent, and what to change."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    refused = any("InvalidAuthToken" in m or "Unauthenticated" in m for m in chain)
    home_token = Path.home() / ".ray" / "auth_token"
    if refused and token:
        return (
            f"Ray at {address} refused lvd's token, taken from {token} (RAY_AUTH_MODE=token): put the "
            f"cluster's token (`ray get-auth-token` on the head) in {home_token} or set RAY_AUTH_TOKEN "
            "/ RAY_AUTH_TOKEN_PATH"
        )
    if refused:
        return (
            f"Ray at {address} requires a token and lvd has none (RAY_AUTH_MODE="
            f"{os.environ.get('RAY_AUTH_MODE', 'unset')}, no {home_token}): copy the head's "
            "~/.ray/auth_token there or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"
        )
    sent = f"token from {token}, RAY_AUTH_MODE=token" if token else "no token"
    return f"could not join Ray at {address} ({sent}): is the address right and its GCS reachable from here?"


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def stem_of(partition: PartitionLike) -> str:
    return getattr(partition, "stem", None) or part_name(partition.index)


def marker_path(stage_dir: Path, stem: str) -> Path:
    return stage_dir / f"{stem}{MARKER_SUFFIX}"


def output_path(stage_dir: Path, stem: str, key: str) -> Path:
    suffix = f".{key}.parquet" if key else ".parquet"
    return stage_dir / f"{stem}{suffix}"


def read_marker(stage_dir: Path, stem: str) -> dict | None:
    try:
        return json.loads(marker_path(stage_dir, stem).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(stage_dir: Path, partition: PartitionLike, cfg_hash: str, *, checksums: bool = False) -> bool:
    """Done = marker matching this input and config, and every output it lists present with
    the recorded size (and, with `checksums`, the recorded sha256). A marker that records no
    sizes (written before they were recorded) proves nothing: the partition reruns."""
    marker = read_marker(stage_dir, stem_of(partition))
    if marker is None:
        return False
    if marker.get("fingerprint") != partition.fingerprint or marker.get("config_hash") != cfg_hash:
        return False
    files = marker.get("files") or {}
    names = list(marker.get("outputs", {}).values())
    if any(name not in files for name in names):
        return False
    for name in names:
        try:
            if (stage_dir / name).stat().st_size != files[name]["bytes"]:
                return False
        except FileNotFoundError:
            return False
        if checksums and durable.file_digest(stage_dir / name)["sha256"] != files[name]["sha256"]:
            return False
    return True


def write_outputs(
    tables: dict[str, pa.Table], partition: PartitionLike, stage_dir: str | Path, cfg_hash: str, **extra
) -> dict:
    """Write a partition's tables durably, then its marker (sizes and sha256 of each output)
    last; returns the marker. `extra` keys go into the marker as they are. Row groups:
    GROUP_ROWS rows (a uid-sorted output read by uid range skips the others), image bytes
    (`rundir.BLOBS`) ~1 MiB (`rundir.blob_group_rows`)."""
    out_dir = Path(stage_dir)
    stem = stem_of(partition)
    written = {}
    for key, table in sorted(tables.items()):
        path = output_path(out_dir, stem, key)
        durable.write_parquet(path, table, row_group_size=blob_group_rows(table) if key == BLOBS else GROUP_ROWS)
        written[key] = (path, table.num_rows)
    return write_marker(written, partition, out_dir, cfg_hash, **extra)


def write_marker(
    written: dict[str, tuple[Path, int]], partition: PartitionLike, stage_dir: str | Path, cfg_hash: str, **extra
) -> dict:
    """The marker of a partition whose outputs (key -> (path, rows)) are written, durably, last;
    returns it (`write_outputs`, and stages that stream an output to its file)."""
    outputs, rows, files = {}, {}, {}
    for key, (path, n) in sorted(written.items()):
        outputs[key or "main"] = Path(path).name
        rows[key or "main"] = n
        files[Path(path).name] = durable.file_digest(path)
    marker = {
        "index": partition.index,
        "fingerprint": partition.fingerprint,
        "config_hash": cfg_hash,
        "outputs": outputs,
        "rows": rows,
        "files": files,
        **extra,
    }
    durable.write_bytes(marker_path(Path(stage_dir), stem_of(partition)), json.dumps(marker, indent=1).encode())
    return marker


def run_one(fn: StageFn, partition: PartitionLike, stage_dir: str, cfg_hash: str) -> dict:
    """Run `fn` on one partition, write its outputs, then its marker; return the marker."""
    return write_outputs(fn(partition), partition, stage_dir, cfg_hash)


def remove_stale(stage_dir: Path, partitions: Sequence[PartitionLike]) -> int:
    """Delete temp files of workers killed mid-write, and markers of partitions no longer
    planned (the input set shrank), so readers that trust markers see only this plan."""
    current = {marker_path(stage_dir, stem_of(p)).name for p in partitions}
    stale = [
        p
        for p in stage_dir.iterdir()
        if durable.is_temp(p.name) or (p.name.endswith(MARKER_SUFFIX) and p.name not in current)
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def plan_stage(
    stage_dir: Path,
    units: Sequence[PartitionLike],
    cfg_hash: str,
    *,
    checksums: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[StageReport, list[PartitionLike]]:
    """The part of a stage run every executor shares: create the folder, drop stale files,
    and split the units into done (their markers go into the report) and to do."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    durable.fsync_dir(stage_dir.parent)  # the stage folder's own name survives a power cut
    remove_stale(stage_dir, units)
    indices = [u.index for u in units]
    if len(set(indices)) != len(indices):
        raise ValueError("partition indices must be unique within a stage")
    report = StageReport(stage_dir=stage_dir)
    todo = []
    for u in units:
        if is_done(stage_dir, u, cfg_hash, checksums=checksums):
            report.skipped.append(u.index)
            report.markers[u.index] = read_marker(stage_dir, stem_of(u))
        else:
            todo.append(u)
    if progress:
        progress(len(report.skipped), len(units))
    return report, todo


def collect(
    report: StageReport, markers: Iterable[dict], n_units: int, progress: ProgressFn | None = None
) -> StageReport:
    """Record each finished unit's marker as it comes (progress after each); sorted report."""
    for marker in markers:
        report.ran.append(marker["index"])
        report.markers[marker["index"]] = marker
        if progress:
            progress(report.total, n_units)
    report.ran.sort()
    report.skipped.sort()
    return report


def map_partitions(
    fn: StageFn,
    partitions: Sequence[PartitionLike],
    stage_dir: Path,
    *,
    cfg_hash: str,
    runner: RunnerConfig = RunnerConfig(),
    progress: ProgressFn | None = None,
) -> StageReport:
    """Run `fn` over every partition not already done, at most `max_in_flight` at once."""
    report, todo = plan_stage(stage_dir, partitions, cfg_hash, checksums=runner.verify_checksums, progress=progress)
    return collect(report, _run_bounded(fn, todo, stage_dir, cfg_hash, runner), len(partitions), progress)


def isolation_for(fn: StageFn):
    """The stage's policy for a partition whose worker keeps dying, or None (the stage fails).

    A stage callable carries one as `fn.isolation` (ingest's: `lvd.curation.isolate`)."""
    return getattr(fn, "isolation", None)


def _run_bounded(fn: StageFn, todo: Iterable[PartitionLike], stage_dir: Path, cfg_hash: str, runner: RunnerConfig):
    """Yield markers as Ray tasks finish, keeping at most `max_in_flight` submitted; partitions
    whose worker died after the retries go to the stage's isolation policy at the end."""
    remote = ray.remote(run_one).options(
        max_retries=runner.max_retries, retry_exceptions=False, num_cpus=runner.num_cpus
    )
    limit = runner.max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    fn_ref = ray.put(fn)  # ship the (possibly large) stage closure once, not per task
    pending: dict = {}
    died: list[tuple[PartitionLike, Exception]] = []

    def collect():
        ready, _ = ray.wait(list(pending), num_returns=1)
        partition = pending.pop(ready[0])
        try:
            return [ray.get(ready[0])]
        except WORKER_DEATHS as e:
            died.append((partition, e))
            return []

    for partition in todo:
        if len(pending) >= limit:
            yield from collect()
        pending[remote.remote(fn_ref, partition, str(stage_dir), cfg_hash)] = partition
    while pending:
        yield from collect()
    if died:
        policy = isolation_for(fn)
        if policy is None:
            raise died[0][1]
        for partition, error in died:
            yield policy.run(fn, partition, stage_dir, cfg_hash, error, runner)
