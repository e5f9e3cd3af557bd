"""The shard stage's plan as it was built before `lvd.curation.stages.shardplan`: a dict per
shipped image and per ingest record in one process. Tests compare the partitioned plan with it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from lvd.curation import rundir
from lvd.curation.stages.select import face_boxes, read_clusters


def shard_rows(run_dir: Path) -> list[dict]:
    """What ships, in shard order (by uid), with its metadata and `blob_run`."""
    retrieval, seeds = {}, {}
    if (sel := rundir.selection(run_dir)) is not None:
        retrieval = {r.pop("uid"): r for r in sel.to_pylist()}
        uids = list(retrieval)
        if (seed_sel := rundir.selection(run_dir, "seeds")) is not None:
            seeds = {r["uid"]: r for r in seed_sel.to_pylist()}
    else:
        uids = rundir.candidates(run_dir)
    clusters = read_clusters(run_dir)
    cids = dict(zip(clusters[0]["uid"].to_pylist(), clusters[0]["cluster_ids"].to_pylist())) if clusters else {}
    first = _first_records(run_dir)
    rows = [
        dict(
            uid=u,
            source=first[u]["source"],
            width=first[u]["width"],
            height=first[u]["height"],
            cluster_ids=tuple(cids.get(u, ())),
            retrieval=retrieval.get(u, {}),
            blob_run=str(run_dir),
            faces=face_boxes(first[u].get("detail")),
        )
        for u in uids
    ]
    for seed_run in sorted({s["run"] for s in seeds.values()}):
        rec = _first_records(Path(seed_run))
        rows += [
            dict(
                uid=u,
                source=rec[u]["source"],
                width=rec[u]["width"],
                height=rec[u]["height"],
                cluster_ids=(),
                retrieval={"method": "seed", "seed_set": s["seed_set"]},
                blob_run=seed_run,
                faces=(),
            )
            for u, s in seeds.items()
            if s["run"] == seed_run
        ]
    return sorted(rows, key=lambda r: r["uid"])


def _first_records(run_dir: Path) -> dict[str, dict]:
    cols = ["source", "status", "uid", "width", "height"]
    cols += ["detail"] if "detail" in pq.read_schema(rundir.ingest_manifests(run_dir)[0]).names else []
    rec = rundir.read_ingest(run_dir, cols).sort_by([("source", "ascending")])
    first: dict[str, dict] = {}
    for r in rec.to_pylist():
        if r["status"] == "accepted":
            first.setdefault(r["uid"], r)
    return first


def plan_rows(rows: list[dict]) -> list[dict]:
    """`shardplan` rows in the reference's form (what ShardFn makes of them)."""
    return [
        dict(
            uid=r["uid"],
            source=r["source"],
            width=r["width"],
            height=r["height"],
            cluster_ids=tuple(r["cluster_ids"] or ()),
            retrieval=json.loads(r["retrieval"]),
            blob_run=r["blob_run"],
            faces=face_boxes(r["detail"]),
        )
        for r in rows
    ]
