"""Precomputed vectors as the embed stage's output (`--vectors DIR`): the per-partition Ray task.

Kept apart from `stages.embed` so that its workers import no torch (a worker's first import of
torch costs seconds). `stages.embed.run_given` plans the partitions and merges the problems.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation import rundir, runner
from lvd.curation import vectors as vec


def _accepted_keys(blobs: str, records: str, run_dir: str, key: str) -> tuple[list[str], dict[str, list[str]]]:
    """The partition's accepted uids in blob order (as the embedder embeds them), and each
    uid's keys in the given folder (itself, or its sources in source order)."""
    rec = rundir.apply_caps(Path(run_dir), pq.read_table(records, columns=["source", "status", "uid"]))
    rec = rec.filter(pc.equal(rec["status"], "accepted")).sort_by([("source", "ascending")]).to_pydict()
    accepted = set(rec["uid"])
    uids = [u for u in pq.read_table(blobs, columns=["uid"])["uid"].to_pylist() if u in accepted]
    if key == "uid":
        return uids, {u: [u] for u in uids}
    keys: dict[str, list[str]] = {}
    for s, u in zip(rec["source"], rec["uid"]):
        keys.setdefault(u, []).append(s)
    return uids, keys


def import_given(
    given: vec.GivenVectors,
    index: int,
    fingerprint: str,
    blobs: str,
    records: str,
    run_dir: str,
    out: str,
    stage_dir: str,
    cfg_hash: str,
) -> dict:
    """One ingest partition's given vectors into the store (a Ray task): its problems, or its
    marker (the embedder's marker, for the partition's blobs file `blobs`)."""
    uids, keys = _accepted_keys(blobs, records, run_dir, given.key)
    try:
        found, vecs_ND, twice = vec.gather_given(given, [k for u in uids for k in keys[u]])
    except vec.GivenVectorsError as e:  # a file's rows do not fit its dimension
        return {"problems": {"unreadable files": (1, [str(e)])}, "marker": None}
    row_of: dict[str, int] = {}
    for i, k in enumerate(found):
        row_of.setdefault(k, i)
    pick = {u: next((row_of[k] for k in keys[u] if k in row_of), None) for u in uids}
    missing = [keys[u][0] for u in uids if pick[u] is None]
    rows = np.array([pick[u] for u in uids if pick[u] is not None], np.int64)
    picked = vecs_ND[rows] if len(rows) else np.zeros((0, given.dim), np.float32)
    norms = np.linalg.norm(picked, axis=1)
    named = [found[r] for r in rows]
    problems = {
        "accepted images have no vector": missing,
        "keys have more than one vector": twice,
        "vectors are not finite (NaN or inf)": [k for k, n in zip(named, norms) if not np.isfinite(n)],
        "vectors are zero": [k for k, n in zip(named, norms) if n == 0],
    }
    problems = {w: (len(items), sorted(items)[:3]) for w, items in problems.items() if items}
    if problems:
        return {"problems": problems, "marker": None}
    vecs16, normalised = vec.to_unit_fp16(picked)
    vec.write_vectors(out, index, uids, vecs16)
    table = pa.table({"vectors": pa.array([len(uids)], pa.int64())})
    unit = runner.WholeStage(fingerprint=fingerprint, stem=runner.part_name(index), index=index)
    marker = runner.write_outputs({"": table}, unit, stage_dir, cfg_hash, given=given.folder, normalised=normalised)
    return {"problems": {}, "marker": marker}
