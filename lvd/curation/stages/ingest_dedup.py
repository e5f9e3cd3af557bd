"""The curation stages as runner work: picklable stage callables and one function per stage.

Kept apart from `runner` (generic, knows no stage) and from `lvd.flows.curate` (Prefect
reporting) so Ray workers import neither Prefect nor the flow, and so a stage can be run
without Prefect (fault tests, notebooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa

from lvd.curation import rundir, runner
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.guard import check_removal
from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.isolate import IngestIsolation
from lvd.curation.rundir import digest, ingest_fingerprint, read_blobs, unique_accepted  # noqa: F401 -- re-exported
from lvd.curation.sources import Partition, plan_partitions


@dataclass(frozen=True)
class IngestFn:
    """Stage callable: one partition -> its records and the bytes of its accepted images."""

    cfg: IngestConfig
    # a partition whose worker keeps dying is re-ingested input by input (runner.isolation_for)
    isolation: ClassVar[IngestIsolation] = IngestIsolation()

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


def plan(inputs: list[str], partition_size: int) -> list[Partition]:
    return plan_partitions(inputs, files_per_partition=partition_size, parquet_rows_per_partition=partition_size)


def run_ingest(
    partitions: list[Partition],
    run_dir: Path,
    cfg: IngestConfig,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    progress: runner.ProgressFn | None = None,
) -> runner.StageReport:
    return runner.map_partitions(
        IngestFn(cfg),
        partitions,
        rundir.stage_dir(run_dir, "ingest"),
        cfg_hash=runner.config_hash(cfg),
        runner=rcfg,
        progress=progress,
    )


def run_dedup(
    run_dir: Path, cfg: DedupConfig, rcfg: runner.RunnerConfig = runner.RunnerConfig(), *, max_remove: float = 1.0
) -> runner.StageReport:
    """One global Ray task (dedup compares everything with everything); refuses, writing
    nothing, when it would drop more than `max_remove` of the unique accepted images."""
    unit = runner.WholeStage(fingerprint=ingest_fingerprint(run_dir), stem="duplicates")
    return runner.map_partitions(
        DedupFn(str(run_dir), cfg, max_remove),
        [unit],
        rundir.stage_dir(run_dir, "dedup"),
        cfg_hash=runner.config_hash(cfg),
        runner=rcfg,
    )
