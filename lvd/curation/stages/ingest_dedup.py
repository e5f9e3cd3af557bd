"""The curation stages as runner work: picklable stage callables and one function per stage.

Kept apart from `runner` (generic, knows no stage) and from `lvd.flows.curate` (Prefect
reporting) so Ray workers import neither Prefect nor the flow, and so a stage can be run
without Prefect (fault tests, notebooks).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from lvd.curation import rundir, runner
from lvd.curation.dedup import DedupConfig, find_near_duplicates
from lvd.curation.guard import check_removal
from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.isolate import IngestIsolation
from lvd.curation.rundir import digest, ingest_fingerprint, read_blobs, unique_accepted  # noqa: F401 -- re-exported
from lvd.curation.scale.hashdedup import ShuffleConfig, partitioned_duplicates, run_sources
from lvd.curation.sources import Partition, plan_partitions

# ingest records (all statuses) from which run_dedup shuffles by default: the single task then
# holds ~1.7 GiB at 10^6 images (issue 14), and the shuffle's fixed cost (~20 s of Ray tasks on
# 2 cores for 3,000 records) is small next to its work
PARTITIONED_MIN_RECORDS = 1_000_000


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
    run_dir: Path,
    cfg: DedupConfig,
    rcfg: runner.RunnerConfig = runner.RunnerConfig(),
    *,
    max_remove: float = 1.0,
    partitioned: bool | None = None,
    shuffle: ShuffleConfig | None = None,
) -> runner.StageReport:
    """Hash dedup of the run; refuses, writing nothing, when it would drop more than
    `max_remove` of the unique accepted images.

    Two paths, one output (tests/curation/test_scale_hashdedup.py checks they are equal):
    one global Ray task holding the pool (small pools), or the shuffle of
    `lvd.curation.scale.hashdedup` (no task holds the pool). `partitioned` True / False
    forces one; None picks the shuffle when the run has at least PARTITIONED_MIN_RECORDS
    ingest records. `shuffle` sizes it (buckets, partitions)."""
    unit = runner.WholeStage(fingerprint=ingest_fingerprint(run_dir), stem="duplicates")
    if shuffles(run_dir, partitioned):
        return _run_partitioned(run_dir, unit, cfg, rcfg, max_remove, shuffle or ShuffleConfig())
    return runner.map_partitions(
        DedupFn(str(run_dir), cfg, max_remove),
        [unit],
        rundir.stage_dir(run_dir, "dedup"),
        cfg_hash=runner.config_hash(cfg),
        runner=rcfg,
    )


def shuffles(run_dir: Path, partitioned: bool | None, min_records: int | None = None) -> bool:
    """Whether `run_dedup` takes the shuffle: forced by `partitioned`, else from `min_records`
    (default PARTITIONED_MIN_RECORDS) ingest records on."""
    if partitioned is not None:
        return partitioned
    return _ingest_records(run_dir) >= (PARTITIONED_MIN_RECORDS if min_records is None else min_records)


def _ingest_records(run_dir: Path) -> int:
    return sum(m["rows"]["main"] for m in rundir.ingest_markers(run_dir).values())


def _run_partitioned(run_dir, unit, cfg, rcfg, max_remove, shuffle) -> runner.StageReport:
    """The shuffle path: scratch under RUN/dedup/shuffle (dropped after), then one task
    checks the guard and writes duplicates.parquet and its marker as the single task would."""
    stage_dir = rundir.stage_dir(run_dir, "dedup")
    cfg_hash = runner.config_hash(cfg)  # same outputs as the single task: same identity
    report, todo = runner.plan_stage(stage_dir, [unit], cfg_hash, checksums=rcfg.verify_checksums)
    if not todo:
        return report
    work = stage_dir / "shuffle"
    shutil.rmtree(work, ignore_errors=True)
    opts = {"num_cpus": rcfg.num_cpus, "max_retries": rcfg.max_retries, **shuffle.task_options}
    shuffle = dataclasses.replace(shuffle, task_options=opts)
    done = partitioned_duplicates(run_sources(run_dir), cfg, work, shuffle)
    finish = ray.remote(_finish_partitioned).options(**opts)
    marker = ray.get(finish.remote(str(done.duplicates), done.records, unit, str(stage_dir), cfg_hash, max_remove))
    shutil.rmtree(work, ignore_errors=True)
    return runner.collect(report, [marker], 1)


def _finish_partitioned(path: str, records: int, unit, stage_dir: str, cfg_hash: str, max_remove: float) -> dict:
    dups = pq.read_table(path)
    check_removal("dedup", dups.num_rows, records, max_remove, largest=_largest(dups))
    return runner.write_outputs({"": dups}, unit, stage_dir, cfg_hash)
