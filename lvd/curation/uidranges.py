"""uid ranges for shuffles through Parquet work files sorted by uid (the ledger's rounds, the
shard plan): a map task writes its rows sorted by uid in small row groups and returns a sample
of its uids; ranges are cut at the samples' quantiles; a range task reads every work file
filtered to its range, and Arrow skips the row groups the statistics rule out."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

GROUP_ROWS = 8192  # rows per row group of a work file


def ray_map(fn, jobs: list[tuple], max_in_flight: int | None = None) -> list:
    """`[fn(*job) for job in jobs]` as Ray tasks, results in job order (`fanout.starmap`), on
    the running Ray or a local one started here; a single job is a task too (its memory is a
    worker's, within its budget, not the driver's)."""
    from lvd.curation import fanout, runner

    runner.init_ray()
    return fanout.starmap(fn, jobs, max_in_flight=max_in_flight, local_below=1)


def ranges(samples: list[str], n_ranges: int) -> list[tuple[str | None, str | None]]:
    """[lo, hi) uid ranges (None: open end) cut at quantiles of the sampled uids."""
    s = sorted(set(samples))
    if n_ranges <= 1 or len(s) < 2:
        return [(None, None)]
    cuts = sorted({s[(i * len(s)) // n_ranges] for i in range(1, n_ranges)} - {s[0]})
    bounds = [None, *cuts, None]
    return list(zip(bounds[:-1], bounds[1:]))


def in_range(column: str, lo: str | None, hi: str | None) -> pc.Expression:
    e = pc.field(column).is_valid()
    if lo is not None:
        e &= pc.field(column) >= lo
    if hi is not None:
        e &= pc.field(column) < hi
    return e


def sample(sorted_uids: list[str], k: int = 32) -> list[str]:
    step = max(1, len(sorted_uids) // k)
    return sorted_uids[::step]


def read_files(paths: list[str], columns: list[str], filt: pc.Expression) -> pa.Table:
    """Rows of the Parquet files `paths` matching `filt`; row groups whose statistics rule the
    filter out are skipped."""
    if not paths:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return ds.dataset(paths, format="parquet").to_table(columns=columns, filter=filt)
