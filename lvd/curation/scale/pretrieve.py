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
from dataclasses import asdict
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
    run, stage = Path(run_dir), Path(stage_dir)
    work = stage / WORK
    shutil.rmtree(work, ignore_errors=True)
    found = rundir.clusters_files(run)
    if found is None:
        raise FileNotFoundError(f"{run}: balanced sampling needs the cluster stage's table (run the cluster stage)")
    table_path, tree_path = found
    levels = tree_levels(pq.read_table(tree_path))
    if not levels:  # no candidates: an empty selection
        merge = ray.remote(_merge).options(**opts)
        return ray.get(merge.remote(str(work), 0, unit, str(stage), cfg_hash))
    k0 = len(levels[0].centroids_KD)
    budget = B.current()
    per_task = B.order_records(budget) if budget is not None else RECORDS_PER_TASK
    meta = pq.ParquetFile(table_path).metadata
    n = meta.num_rows
    nb = tasks_for(n, per_task)
    chunks, groups, rows = [], [], 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= per_task or g == meta.num_row_groups - 1:
            chunks.append(tuple(groups))
            groups, rows = [], 0
    got = _wave(_map, [(str(table_path), str(work), c, g, k0, nb, seed) for c, g in enumerate(chunks)], opts)
    sizes = np.sum([g[0] for g in got], axis=0) if got else np.zeros(k0, np.int64)
    quota = leaf_quotas(levels, sizes, target, np.random.default_rng(seed))
    bounds = uidranges.ranges(sorted(u for g in got for u in g[1]), tasks_for(int(quota.sum()), per_task))
    cuts = tuple(hi for _, hi in bounds[:-1])
    _wave(_take, [(str(work), b, quota, cuts) for b in range(nb)], opts)
    merge = ray.remote(_merge).options(**opts)
    marker = ray.get(merge.remote(str(work), len(cuts) + 1, unit, str(stage), cfg_hash))
    shutil.rmtree(work, ignore_errors=True)
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


def _take(work: str, b: int, quota: np.ndarray, cuts: tuple[str, ...]) -> int:
    """Step 3 for leaf bucket b."""
    files = sorted((Path(work) / "map").glob("c*.parquet"))
    where = pc.field("bucket") == b
    t = pa.concat_tables([pq.read_table(f, columns=["uid", "leaf", "score", "key"], filters=where) for f in files])
    rows = take_per_group(t["leaf"].to_numpy(), t["key"].to_numpy(), quota)
    sel = t.take(pa.array(rows))
    uids = np.asarray(sel["uid"].to_pylist(), object)
    r_of = np.searchsorted(np.array(cuts, dtype=object), uids, side="right") if cuts else np.zeros(len(uids), int)
    for r in np.unique(r_of):
        path = Path(work) / "sel" / f"r{int(r):06d}" / f"b{b:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_parquet(path, sel.filter(pa.array(r_of == r)).select(["uid", "leaf", "score"]))
    return len(rows)


def _merge(work: str, n_ranges: int, unit, stage_dir: str, cfg_hash: str) -> dict:
    """Step 4: selection.parquet by uid range, the counts and seeds tables, then the marker."""
    stage = Path(stage_dir)
    stem = runner.stem_of(unit)
    path = runner.output_path(stage, stem, "")
    n, leaves = 0, set()

    def write(f):
        nonlocal n
        with pq.ParquetWriter(f, SELECTION_SCHEMA) as w:
            for r in range(n_ranges):
                files = sorted((Path(work) / "sel" / f"r{r:06d}").glob("b*.parquet"))
                if not files:
                    continue
                t = pa.concat_tables([pq.read_table(p) for p in files]).sort_by([("uid", "ascending")])
                m = t.num_rows
                sims = np.round(t["score"].to_numpy().astype(np.float32).astype(np.float64), 6)
                out = pa.table(
                    {
                        "uid": t["uid"],
                        "method": pa.array(["balanced"] * m, pa.string()),
                        "seed_set": pa.array(["*"] * m, pa.string()),
                        "seed_uid": pa.nulls(m, pa.string()),
                        "cluster_id": t["leaf"],
                        "similarity": pa.array(sims, pa.float64()),
                    },
                    schema=SELECTION_SCHEMA,
                )
                w.write_table(out, row_group_size=runner.GROUP_ROWS)
                n += m
                leaves.update(np.unique(t["leaf"].to_numpy()).tolist())

    durable.write_atomic(path, write)
    counts = RetrievalCounts(n_seeds=0, n_hits=n, n_collisions=0, n_clusters=len(leaves), n_capped=0, n_selected=n)
    written = {"": (path, n)}
    for key, table in (
        ("counts", pa.Table.from_pylist([dict(seed_set="*", overlaps=0, **asdict(counts))])),
        ("seeds", SEEDS_SCHEMA.empty_table()),
    ):
        p = runner.output_path(stage, stem, key)
        durable.write_parquet(p, table, row_group_size=runner.GROUP_ROWS)
        written[key] = (p, table.num_rows)
    return runner.write_marker(written, unit, stage, cfg_hash, partitioned=True)
