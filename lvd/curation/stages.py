"""The curation stages as runner work: picklable stage callables and one function per stage.

Kept apart from `runner` (generic, knows no stage) and from `lvd.flows.curate` (Prefect
reporting) so Ray workers import neither Prefect nor the flow, and so a stage can be run
without Prefect (fault tests, notebooks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation import ledger, runner
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.guard import check_removal
from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.sources import Partition, plan_partitions

# Ingest columns dedup never needs; everything else (hashes, sizes, any newer hash column)
# is handed to `find_near_duplicates`, which picks what its config asks for.
NOT_FOR_DEDUP = {"meta", "reason", "format", "nbytes"}


@dataclass(frozen=True)
class IngestFn:
    """Stage callable: one partition -> its records and the bytes of its accepted images."""

    cfg: IngestConfig

    def __call__(self, partition: Partition) -> dict[str, pa.Table]:
        out = ingest_partition(partition, self.cfg)
        return {"": out.records, "blobs": out.blobs}


@dataclass(frozen=True)
class DedupFn:
    """Stage callable: all accepted records of a run -> its near-duplicate table."""

    run_dir: str
    cfg: DedupConfig
    max_remove: float = 1.0  # guard: refuse when more than this fraction would be dropped

    def __call__(self, unit: runner.WholeStage) -> dict[str, pa.Table]:
        table = unique_accepted(Path(self.run_dir))
        dups = find_near_duplicates(table, self.cfg)
        largest = _largest(dups)
        check_removal("dedup", dups.num_rows, table.num_rows, self.max_remove, largest=largest)
        return {"": dups}


def _largest(dups: pa.Table, top: int = 4, per: int = 8) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for u, rep in zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist()):
        groups.setdefault(rep, [rep]).append(u)
    return [g[:per] for g in sorted(groups.values(), key=lambda g: (-len(g), g[0]))[:top]]


def unique_accepted(run_dir: Path) -> pa.Table:
    """One row per accepted uid (its first input by source order): what dedup compares."""
    names = pq.read_schema(ledger.ingest_manifests(run_dir)[0]).names
    t = ledger.read_ingest(run_dir, [c for c in names if c not in NOT_FOR_DEDUP])
    t = t.filter(pc.equal(t["status"], "accepted")).sort_by([("source", "ascending")])
    seen: set[str] = set()
    keep = [not (u in seen or seen.add(u)) for u in t["uid"].to_pylist()]
    return t.filter(pa.array(keep, pa.bool_())).drop_columns(["status", "source"])


def plan(inputs: list[str], partition_size: int) -> list[Partition]:
    return plan_partitions(
        inputs, files_per_partition=partition_size, parquet_rows_per_partition=partition_size
    )


def run_ingest(
    partitions: list[Partition],
    run_dir: Path,
    cfg: IngestConfig,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    progress: runner.ProgressFn | None = None,
) -> runner.StageReport:
    return runner.map_partitions(
        IngestFn(cfg), partitions, run_dir / "ingest", cfg_hash=runner.config_hash(cfg),
        runner=rcfg, progress=progress,
    )


def ingest_markers(run_dir: Path) -> dict[int, dict]:
    """Partition index -> done-marker of every done ingest partition."""
    markers = {}
    for path in sorted((run_dir / "ingest").glob(f"part-*{runner.MARKER_SUFFIX}")):
        m = json.loads(path.read_text())
        markers[m["index"]] = m
    return markers


def ingest_fingerprint(run_dir: Path) -> str:
    """Digest of every done ingest partition's input and config: dedup's input identity."""
    digest = hashlib.sha256()
    for marker in sorted((run_dir / "ingest").glob(f"part-*{runner.MARKER_SUFFIX}")):
        m = json.loads(marker.read_text())
        digest.update(f"{m['index']}:{m['fingerprint']}:{m['config_hash']}\n".encode())
    return digest.hexdigest()


def run_dedup(
    run_dir: Path, cfg: DedupConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig(), *, max_remove: float = 1.0
) -> runner.StageReport:
    """One global Ray task (dedup compares everything with everything); refuses, writing
    nothing, when it would drop more than `max_remove` of the unique accepted images."""
    unit = runner.WholeStage(fingerprint=ingest_fingerprint(run_dir), stem="duplicates")
    return runner.map_partitions(
        DedupFn(str(run_dir), cfg, max_remove), [unit], run_dir / "dedup", cfg_hash=runner.config_hash(cfg),
        runner=rcfg,
    )


def digest(*dirs: Path) -> str:
    """Digest of every done-marker under `dirs`: the identity of what a later stage reads."""
    h = hashlib.sha256()
    for d in dirs:
        for m in sorted(Path(d).glob(f"*{runner.MARKER_SUFFIX}")):
            h.update(f"{d.name}/{m.name}\n".encode() + m.read_bytes())
    return h.hexdigest()


def read_blobs(run_dir: Path, uids: set[str]) -> dict[str, bytes]:
    """Image bytes of a few uids, looked up across the ingest blob files."""
    found: dict[str, bytes] = {}
    for path in sorted((run_dir / "ingest").glob("part-*.blobs.parquet")):
        if not (want := uids - found.keys()):
            break
        t = pq.read_table(path, filters=[("uid", "in", sorted(want))])
        found.update(zip(t["uid"].to_pylist(), t["data"].to_pylist()))
    return found


def curate_without_prefect(
    inputs: list[str], run_dir: Path, *, partition_size: int, ingest_cfg: IngestConfig,
    dedup_cfg: DedupConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig(), shard_cfg=None,
    shard: bool = False,
) -> pa.Table:
    """ingest -> dedup -> [shard everything] -> ledger on the current Ray, no reporting; with
    `shard=True` this is what `lvd curate` does without an embedder. Returns the ledger."""
    from lvd.curation.shards import ShardConfig
    from lvd.curation.stages_select import run_shards  # imports this module

    run_ingest(plan(inputs, partition_size), run_dir, ingest_cfg, rcfg)
    run_dedup(run_dir, dedup_cfg, rcfg)
    if shard:
        run_shards(run_dir, shard_cfg or ShardConfig(), rcfg)
    return ledger.write_ledger(run_dir)
