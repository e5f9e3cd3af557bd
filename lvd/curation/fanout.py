"""Map a picklable function over a list of work items with Ray tasks, results in order.

For the decision work inside a global stage (pair verification): the stage runs as one Ray
task, and its items fan out as nested tasks (a task blocked in `ray.get` lends its CPU back to
them). Without a running Ray (unit tests, notebooks) the items run in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

_NO_SHARED = object()


def parallel_map(
    fn: Callable[..., Any],
    items: Sequence[Any],
    *,
    shared: Any = _NO_SHARED,
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
    local_below: int = 2,
) -> list[Any]:
    """[fn(x) for x in items] (or [fn(shared, x) ...]), as Ray tasks when Ray is running (at
    most `max_in_flight` at once, default twice the cluster's CPUs), else in this process;
    fewer than `local_below` items run in this process too (1: a single item is a task, so
    its memory is a worker's, not the caller's). `shared` goes into the object store once
    (numpy arrays in it are read zero-copy by every task) instead of travelling with each item."""
    if len(items) < local_below or not ray.is_initialized():
        return [fn(x) if shared is _NO_SHARED else fn(shared, x) for x in items]
    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(_call)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    fn_ref = ray.put(fn)
    shared_ref = None if shared is _NO_SHARED else ray.put(shared)
    results: dict[int, Any] = {}
    pending: dict[ray.ObjectRef, int] = {}
    for i, x in enumerate(items):
        if len(pending) >= limit:
            _collect(pending, results)
        pending[remote.remote(fn_ref, x) if shared_ref is None else remote.remote(fn_ref, x, shared_ref)] = i
    while pending:
        _collect(pending, results)
    return [results[i] for i in range(len(items))]


def starmap(
    fn: Callable[..., Any], jobs: Sequence[tuple], *, max_in_flight: int | None = None, local_below: int = 2
) -> list[Any]:
    """[fn(*job) for job in jobs] through `parallel_map` (Ray tasks when Ray runs)."""
    return parallel_map(_Star(fn), jobs, max_in_flight=max_in_flight, local_below=local_below)


class _Star:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, job: tuple) -> Any:
        return self.fn(*job)


def _collect(pending: dict, results: dict) -> None:
    done, _ = ray.wait(list(pending), num_returns=1)
    for ref in done:
        results[pending.pop(ref)] = ray.get(ref)


def _call(fn, x, *shared):
    return fn(*shared, x)
