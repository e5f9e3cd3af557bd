"""Balanced sampling of the cluster tree (the retrieve stage without seeds, LVD-142M's path) with
no process holding the pool.

Under a scratch folder (`RUN/retrieve/_work`, dropped after):

1. map, a task per chunk of `clusters.parquet`'s row groups: its level-1 cluster sizes, a uid
   sample, and its rows (uid, leaf, score, key = `hierarchical.uid_keys`) by leaf bucket
   (leaf mod buckets), a file sorted by bucket in row groups.
2. The driver adds the sizes and splits the target top-down over the tree
   (`hierarchical.leaf_quotas`: the same water filling and random draws as in one process).
3. take, a task per leaf bucket: in each of its leaves the quota rows with the smallest key
   (`hierarchical.take_per_group`); the rows go to uid ranges cut at the samples.
4. One task writes `selection.parquet` a uid range at a time, sorted by uid, with the counts and
   the (empty) seeds table, then the marker, as the one-task stage does.

The result equals the one-task stage's (`stages.retrieve`, which keys its draw by
`hierarchical.uid_keys` too) row for row.

Memory: a map task holds one chunk (`RECORDS_PER_TASK` rows, or `budget.order_records`), a
take task one leaf bucket, the merging task one uid range of the selection. The driver holds
the tree and one size and quota per level-1 cluster.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lvd import durable
from lvd.curation import rundir, runner, uidranges
from lvd.curation.hierarchical import leaf_quotas, take_per_group, uid_keys
from lvd.curation.retrieve import RetrievalCounts
from lvd.curation.scale import budget as B
from lvd.curation.scale.poolorder import RECORDS_PER_TASK, tasks_for
from lvd.curation.scale.poolorder import wave as _wave
from lvd.curation.stages.select import tree_levels

WORK = "_work"
SELECTION_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("method", pa.string()),
        ("seed_set", pa.string()),
        ("seed_uid", pa.string()),
        ("cluster_id", pa.int64()),
        ("similarity", pa.float64()),
    ]
)
SEEDS_SCHEMA = pa.schema([("uid", pa.string()), ("seed_set", pa.string()), ("run", pa.string())])


def balanced_partitioned(run_dir: Path, target: int, seed: int, unit, stage_dir: Path, cfg_hash: str,
                         opts: dict) -> dict:  # fmt: skip
    """Steps 1-4 of the module doc; returns the stage's marker."""
    work = Path(stage_dir) / WORK
    pool = map_clusters(run_dir, work, seed, opts)
    quota = leaf_quotas(pool.levels, pool.sizes, target, np.random.default_rng(seed)) if pool.levels else None
    n = int(quota.sum()) if quota is not None else 0
    n_leaves = int((quota > 0).sum()) if quota is not None else 0
    counts = RetrievalCounts(n_seeds=0, n_hits=n, n_collisions=0, n_clusters=n_leaves, n_capped=0, n_selected=n)
    table = pa.Table.from_pylist([dict(seed_set="*", overlaps=0, **asdict(counts))])
    sets = [] if quota is None else [("*", "balanced", quota)]
    return take_and_merge(pool, sets, unit, stage_dir, cfg_hash, opts, table, SEEDS_SCHEMA.empty_table())


@dataclass(frozen=True)
class MappedClusters:
    """Step 1's result: the tree's levels, level-1 sizes, the uid sample and the leaf buckets."""

    work: str
    levels: tuple
    sizes: np.ndarray  # int64 [k0]
    samples: list[str]  # uid sample of the candidates, sorted (uid range cuts)
    buckets: int
    per_task: int


def map_clusters(run_dir: Path, work: Path, seed: int, opts: dict) -> MappedClusters:
    """Step 1 under `work` (emptied first); the tree's levels are empty when there are no
    candidates."""
    run, work = Path(run_dir), Path(work)
    shutil.rmtree(work, ignore_errors=True)
    found = rundir.clusters_files(run)
    if found is None:
        raise FileNotFoundError(f"{run}: this retrieval needs the cluster stage's table (run the cluster stage)")
    table_path, tree_path = found
    levels = tree_levels(pq.read_table(tree_path))
    budget = B.current()
    per_task = B.order_records(budget) if budget is not None else RECORDS_PER_TASK
    if not levels:
        return MappedClusters(str(work), (), np.zeros(0, np.int64), [], 0, per_task)
    k0 = len(levels[0].centroids_KD)
    meta = pq.ParquetFile(table_path).metadata
    nb = tasks_for(meta.num_rows, per_task)
    chunks, groups, rows = [], [], 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= per_task or g == meta.num_row_groups - 1:
            chunks.append(tuple(groups))
            groups, rows = [], 0
    got = _wave(_map, [(str(table_path), str(work), c, g, k0, nb, seed) for c, g in enumerate(chunks)], opts)
    sizes = np.sum([g[0] for g in got], axis=0) if got else np.zeros(k0, np.int64)
    return MappedClusters(str(work), tuple(levels), sizes, sorted(u for g in got for u in g[1]), nb, per_task)


def take_and_merge(pool: MappedClusters, sets: list[tuple[str, str, np.ndarray]], unit, stage_dir: Path,
                   cfg_hash: str, opts: dict, counts: pa.Table, seeds: pa.Table) -> dict:  # fmt: skip
    """Steps 3-4 for `sets` = (seed set, method, quota per level-1 cluster), unioned in that order
    (an image taken for several sets is credited to the first); returns the stage's marker and
    drops the scratch folder."""
    n = max((int(q.sum()) for _, _, q in sets), default=0) * max(1, len(sets))
    bounds = uidranges.ranges(pool.samples, tasks_for(n, pool.per_task))
    cuts = tuple(hi for _, hi in bounds[:-1])
    if sets:
        _wave(_take, [(pool.work, b, sets, cuts) for b in range(pool.buckets)], opts)
    merge = ray.remote(merge_selection).options(**opts)
    marker = ray.get(merge.remote(pool.work, len(cuts) + 1, unit, str(stage_dir), cfg_hash, counts, seeds))
    shutil.rmtree(pool.work, ignore_errors=True)
    return marker


def _map(table_path: str, work: str, c: int, groups: tuple[int, ...], k0: int, nb: int, seed: int):
    """Step 1 for one chunk of row groups."""
    t = pq.ParquetFile(table_path).read_row_groups(list(groups), columns=["uid", "leaf", "score"])
    leaf = t["leaf"].to_numpy()
    uids = t["uid"].to_pylist()
    t = t.append_column("key", pa.array(uid_keys(uids, seed)))
    t = t.append_column("bucket", pa.array(leaf % nb)).sort_by("bucket")
    path = Path(work) / "map" / f"c{c:06d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_parquet(path, t, row_group_size=16_384)
    return np.bincount(leaf, minlength=k0).astype(np.int64), uidranges.sample(sorted(uids))


def _take(work: str, b: int, sets: list[tuple[str, str, np.ndarray]], cuts: tuple[str, ...]) -> int:
    """Step 3 for leaf bucket b: every set's quota rows, the first set's provenance kept."""
    files = sorted((Path(work) / "map").glob("c*.parquet"))
    where = pc.field("bucket") == b
    t = pa.concat_tables([pq.read_table(f, columns=["uid", "leaf", "score", "key"], filters=where) for f in files])
    leaf, key = t["leaf"].to_numpy(), t["key"].to_numpy()
    taken = np.full(t.num_rows, -1, np.int64)  # the first set that took each row
    for i, (_, _, quota) in enumerate(sets):
        rows = take_per_group(leaf, key, quota)
        rows = rows[taken[rows] < 0]
        taken[rows] = i
    rows = np.flatnonzero(taken >= 0)
    sel = t.take(pa.array(rows))
    m = len(rows)
    out = pa.table(
        {
            "uid": sel["uid"],
            "method": pa.array([sets[i][1] for i in taken[rows]], pa.string()),
            "seed_set": pa.array([sets[i][0] for i in taken[rows]], pa.string()),
            "seed_uid": pa.nulls(m, pa.string()),
            "cluster_id": sel["leaf"],
            "similarity": pa.array(np.round(sel["score"].to_numpy().astype(np.float32).astype(np.float64), 6)),
        },
        schema=SELECTION_SCHEMA,
    )
    write_ranges(Path(work), f"b{b:06d}", out, cuts)
    return m


def write_ranges(work: Path, name: str, table: pa.Table, cuts: tuple[str, ...]) -> None:
    """Selection rows to their uid ranges (`sel/r{r}/{name}.parquet`), for `merge_selection`."""
    uids = np.asarray(table["uid"].to_pylist(), object)
    r_of = np.searchsorted(np.array(cuts, dtype=object), uids, side="right") if cuts else np.zeros(len(uids), int)
    for r in np.unique(r_of):
        path = Path(work) / "sel" / f"r{int(r):06d}" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_parquet(path, table.filter(pa.array(r_of == r)))


def merge_selection(work: str, n_ranges: int, unit, stage_dir: str, cfg_hash: str, counts: pa.Table,
                    seeds: pa.Table) -> dict:  # fmt: skip
    """Step 4: selection.parquet by uid range, the counts and seeds tables, then the marker."""
    stage = Path(stage_dir)
    stem = runner.stem_of(unit)
    path = runner.output_path(stage, stem, "")
    n = 0

    def write(f):
        nonlocal n
        with pq.ParquetWriter(f, SELECTION_SCHEMA) as w:
            for r in range(n_ranges):
                files = sorted((Path(work) / "sel" / f"r{r:06d}").glob("*.parquet"))
                if not files:
                    continue
                t = pa.concat_tables([pq.read_table(p) for p in files]).sort_by([("uid", "ascending")])
                w.write_table(t.cast(SELECTION_SCHEMA), row_group_size=runner.GROUP_ROWS)
                n += t.num_rows

    durable.write_atomic(path, write)
    written = {"": (path, n)}
    for key, table in (("counts", counts), ("seeds", seeds)):
        p = runner.output_path(stage, stem, key)
        durable.write_parquet(p, table, row_group_size=runner.GROUP_ROWS)
        written[key] = (p, table.num_rows)
    return runner.write_marker(written, unit, stage, cfg_hash, partitioned=True)
