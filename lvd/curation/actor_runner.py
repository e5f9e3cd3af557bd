"""Map a stage over units with long-lived Ray actors: state (a model) loaded once per actor.

`runner.map_partitions` starts one Ray task per partition, so anything a task needs is built
again each time; an embedding model takes seconds to load, so the embed stage instead keeps
`n_actors` actors, each building its state once (`make_state()`) and then running
`fn(state, unit)` for unit after unit. Outputs, done-markers and resume are exactly
`runner`'s: each unit goes through `runner.run_one` (durable writes, sizes and sha256 in the
marker), so a unit is done when its marker matches, and a killed actor leaves at most temp files (Ray restarts it, `max_restarts`, and the
unit is resubmitted; exceptions are not retried, as in `runner`).

`runner` and this module are the two curation modules that import Ray; both are generic
(they know no stage) and share the plan / stale / done / report steps (`runner.plan_stage`,
`runner.collect`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    max_restarts: int = 2  # Ray restarts a dead actor this often
    max_task_retries: int = 2  # and resubmits the unit it was running this often
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

    def apply(self, fn, unit):
        """`fn(state, unit)`, returned to the caller."""
        return fn(self.state, unit)

    def run(self, fn, unit, stage_dir: str, cfg_hash: str) -> dict:
        """`fn(state, unit)` written as the unit's outputs and marker (`runner.run_one`)."""
        return runner.run_one(partial(fn, self.state), unit, stage_dir, cfg_hash)


@contextmanager
def actor_pool(make_state: Callable[[], Any], acfg: ActorConfig, n_units: int) -> Iterator[ray.util.ActorPool]:
    """A pool of actors, each holding `make_state()` (built once per actor, and again by Ray
    after a restart); every actor is killed on leaving, whether the work finished or failed."""
    n, num_gpus = resources(acfg, n_units)
    cls = ray.remote(_Worker).options(
        num_gpus=num_gpus,
        num_cpus=acfg.num_cpus,
        max_restarts=acfg.max_restarts,
        max_task_retries=acfg.max_task_retries,
    )
    actors = [cls.remote(make_state) for _ in range(n)]
    try:
        yield ray.util.ActorPool(actors)
    finally:
        for a in actors:
            ray.kill(a)


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
    """Run `fn(state, unit)` on every unit not done, spread over actors; markers as `runner`.
    The actors are killed when the stage ends, whether it finished or failed."""
    report, todo = runner.plan_stage(stage_dir, units, cfg_hash, checksums=acfg.verify_checksums, progress=progress)
    if not todo:
        return runner.collect(report, [], len(units))
    with actor_pool(make_state, acfg, len(todo)) as pool:
        done = pool.map_unordered(lambda a, u: a.run.remote(fn, u, str(stage_dir), cfg_hash), todo)
        return runner.collect(report, done, len(units), progress)
