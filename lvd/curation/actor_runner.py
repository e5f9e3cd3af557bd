"""Map a stage over units with long-lived Ray actors: state (a model) loaded once per actor.

`runner.map_partitions` starts one Ray task per partition, so anything a task needs is built
again each time; an embedding model takes seconds to load, so the embed stage instead keeps
`n_actors` actors, each building its state once (`make_state()`) and then running
`fn(state, unit)` for unit after unit. Outputs, done-markers and resume are exactly
`runner`'s: each unit goes through `runner.run_one` (durable writes, sizes and sha256 in the
marker), so a unit is done when its marker matches, and a killed actor leaves at most temp files (Ray restarts it, `max_restarts`, and the
unit is resubmitted; exceptions are not retried, as in `runner`).

With this module `runner` is no longer the only curation module importing Ray; both are
generic (they know no stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from lvd.curation import runner


@dataclass(frozen=True, kw_only=True)
class ActorConfig:
    """n_actors: None = one per GPU when the cluster has GPUs, else 1 (a CPU model already
    uses every core through torch's intra-op threads). num_gpus: per actor; None = 1 when the
    cluster has a GPU, else 0."""

    n_actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    max_restarts: int = 2
    verify_checksums: bool = False  # as RunnerConfig.verify_checksums

    def __post_init__(self) -> None:
        if self.n_actors is not None and self.n_actors < 1:
            raise ValueError(f"n_actors={self.n_actors}: use None (auto) or at least 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus={self.num_gpus}: use None (auto), 0 or more")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts}: use 0 or more")


class _Worker:
    def __init__(self, make_state: Callable[[], Any]) -> None:
        self.state = make_state()

    def run(self, fn, unit, stage_dir: str, cfg_hash: str) -> dict:
        return runner.run_one(partial(fn, self.state), unit, stage_dir, cfg_hash)


def resources(acfg: ActorConfig, n_units: int) -> tuple[int, float]:
    """(actors, GPUs per actor) for this cluster and this many units to do."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = acfg.num_gpus if acfg.num_gpus is not None else (1.0 if gpus else 0.0)
    n = acfg.n_actors or (max(1, gpus) if num_gpus else 1)
    return max(1, min(n, n_units)), num_gpus


def map_with_actors(
    make_state: Callable[[], Any],
    fn: Callable[[Any, Any], dict[str, pa.Table]],
    units: Sequence[runner.PartitionLike],
    stage_dir: Path,
    *,
    cfg_hash: str,
    acfg: ActorConfig = ActorConfig(),
    progress: runner.ProgressFn | None = None,
) -> runner.StageReport:
    """Run `fn(state, unit)` on every unit not done, spread over actors; markers as `runner`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    runner.remove_stale(stage_dir, units)
    report = runner.StageReport(stage_dir=stage_dir)
    todo = []
    for u in units:
        if runner.is_done(stage_dir, u, cfg_hash, checksums=acfg.verify_checksums):
            report.skipped.append(u.index)
            report.markers[u.index] = runner.read_marker(stage_dir, runner.stem_of(u))
        else:
            todo.append(u)
    if progress:
        progress(len(report.skipped), len(units))
    if todo:
        n, num_gpus = resources(acfg, len(todo))
        cls = ray.remote(_Worker).options(
            num_gpus=num_gpus, num_cpus=acfg.num_cpus, max_restarts=acfg.max_restarts, max_task_retries=2
        )
        actors = [cls.remote(make_state) for _ in range(n)]
        pool = ray.util.ActorPool(actors)
        args = (fn, str(stage_dir), cfg_hash)
        for marker in pool.map_unordered(lambda a, u: a.run.remote(args[0], u, args[1], args[2]), todo):
            report.ran.append(marker["index"])
            report.markers[marker["index"]] = marker
            if progress:
                progress(report.total, len(units))
        for a in actors:
            ray.kill(a)
    report.ran.sort()
    report.skipped.sort()
    return report
