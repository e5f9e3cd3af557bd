"""The shard stage's plan: what ships, in uid order, with its metadata, written as Parquet by
Ray tasks, so that no process holds a row per image. (Before, the flow's process built a dict
per shipped image and per ingest record, and each shard unit carried its rows: 2.8 GB at
10^6 images, measured; ~400 GB at 142M.)

Round 1, a task per ingest partition (of the run, and of each seed run when seeds ship): the
partition's accepted records (uid, source, width, height, detail), with the partition and the
run whose blob files hold their bytes, sorted by uid into a work file.
Round 2, a task per uid range (cut at round 1's sampled uids, `range_rows` each), reading
every work file and the global stages' tables filtered to its range:
- each uid's first record by source order (the one the ledger keeps);
- what ships: retrieve's selection, or without a retrieval the candidates (first records less
  the final duplicates and the decontaminated), plus the shipped seeds with their own runs'
  records;
- each shipped uid's cluster ids;
sorted by uid into `plan/r{R}.parquet` (`PLAN_SCHEMA`). It returns its row count and the
file's digest.
The driver holds (rows, digest) per range. Shard i ships plan rows [i*S, (i+1)*S) of the ranges
laid end to end (`Plan.slices`: a slice of one or a few plan files), and its fingerprint is
the digests of those files with the slice bounds: equal inputs give equal plan files, so a
rerun skips the shards already written.
Memory: a round-1 task holds one partition's records; a round-2 task its range's records and
rows of the selection, clusters, duplicates and decontamination tables (~range_rows).
A shard task reads its slices and, per blobs file its rows come from (each row names it), the
row groups of that file that hold them (`rundir.read_blob_file`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd import durable
from lvd.curation import rundir, runner, uidranges

PLAN_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("cluster_ids", pa.list_(pa.int64())),  # one id per clustering level, coarsest first
        ("retrieval", pa.string()),  # the sample's provenance, JSON ({} when no retrieval ran)
        ("blob_run", pa.string()),  # the run whose ingest blob files hold the bytes
        ("blob_file", pa.string()),  # its ingest partition's blobs file
        ("detail", pa.string()),  # ingest's detail (face boxes); null for seeds
    ]
)
RANGE_ROWS = 2_000_000  # records per round-2 task
WORK = "_plan"  # under RUN/shard_parts/
_RECORD_COLUMNS = ["uid", "source", "width", "height", "detail", "blob_file", "blob_run"]


@dataclass(frozen=True)
class Plan:
    files: tuple[str, ...]  # plan files in uid order
    rows: tuple[int, ...]
    digests: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.rows)

    def slices(self, start: int, stop: int) -> tuple[tuple[str, int, int], ...]:
        """(file, first row, end row) covering plan rows [start, stop) of the files end to end."""
        out, offset = [], 0
        for path, n in zip(self.files, self.rows):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                out.append((path, lo - offset, hi - offset))
            offset += n
        return tuple(out)

    def fingerprint(self, slices) -> str:
        digest = dict(zip(self.files, self.digests))
        return runner.config_hash([(digest[path], lo, hi) for path, lo, hi in slices])


def work_dir(run_dir: Path) -> Path:
    return rundir.stage_dir(run_dir, "shard_parts") / WORK


def plan(run_dir: Path, *, range_rows: int = RANGE_ROWS) -> Plan:
    """Write the plan files (module doc) under `work_dir(run_dir)`, anew."""
    run_dir = Path(run_dir)
    work = work_dir(run_dir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "records").mkdir(parents=True)
    seeds = rundir.selection(run_dir, "seeds")
    seed_runs = sorted(set(seeds["run"].to_pylist())) if seeds is not None else []
    files: dict[str, list[str]] = {"main": [], "seed": []}
    jobs = []
    for kind, run in [("main", run_dir)] + [("seed", Path(s)) for s in seed_runs]:
        blobs = rundir.ingest_blob_files(run)  # the markers, read once here, not per shard
        for i, main in zip(sorted(blobs), rundir.ingest_manifests(run)):
            out = str(work / "records" / f"{len(jobs):06d}.parquet")
            jobs.append((str(run), str(blobs[i]), str(main), out))
            files[kind].append(out)
    got = uidranges.ray_map(_records, jobs)
    main_files, seed_files = files["main"], files["seed"]
    n = sum(g["rows"] for g in got)
    ranges = uidranges.ranges([u for g in got for u in g["sample"]], -(-n // range_rows))
    outs = [str(work / f"r{r:06d}.parquet") for r in range(len(ranges))]
    jobs2 = [(str(run_dir), main_files, seed_files, lo, hi, out) for (lo, hi), out in zip(ranges, outs)]
    done = uidranges.ray_map(_plan_range, jobs2)
    shutil.rmtree(work / "records", ignore_errors=True)
    return Plan(tuple(outs), tuple(d["rows"] for d in done), tuple(d["sha256"] for d in done))


def _records(run_dir: str, blob_file: str, main_file: str, out: str) -> dict:
    """Round 1: one partition's accepted records sorted by uid (then source), as a work file."""
    names = pq.read_schema(main_file).names
    cols = ["source", "status", "uid", "width", "height"] + (["detail"] if "detail" in names else [])
    t = rundir.apply_caps(Path(run_dir), pq.read_table(main_file, columns=cols))
    t = t.filter(pc.equal(t["status"], "accepted")).drop_columns(["status"])
    n = len(t)
    if "detail" not in names:
        t = t.append_column("detail", pa.nulls(n, pa.string()))
    t = t.append_column("blob_file", pa.array([blob_file] * n, pa.string()))
    t = t.append_column("blob_run", pa.array([run_dir] * n, pa.string()))
    t = t.select(_RECORD_COLUMNS).sort_by([("uid", "ascending"), ("source", "ascending")])
    pq.write_table(t, out, row_group_size=uidranges.GROUP_ROWS)
    return {"rows": n, "sample": uidranges.sample(t["uid"].to_pylist())}


def _plan_range(run_dir: str, main_files: list[str], seed_files: list[str], lo, hi, out: str) -> dict:
    """Round 2: the shipped rows of uids in [lo, hi), sorted by uid, as a plan file."""
    run = Path(run_dir)
    where = uidranges.in_range("uid", lo, hi)
    rec = uidranges.read_files(main_files, _RECORD_COLUMNS, where)
    first = rec.take(rundir.first_by_source(rec))
    sel = rundir.selection(run, where=where)
    if sel is None:  # no retrieval: every candidate ships, with no provenance
        for gone in (rundir.duplicates(run, where=where), rundir.decontaminated(run, where=where)):
            if gone is not None:
                first = first.filter(pc.invert(pc.is_in(first["uid"], value_set=gone["uid"])))
        ship = first.append_column("retrieval", pa.array(["{}"] * len(first), pa.string()))
    else:
        info = sel.drop_columns(["uid"])
        provenance = [json.dumps(r) for r in info.to_pylist()]
        prov = pa.table({"uid": sel["uid"], "retrieval": pa.array(provenance, pa.string())})
        ship = first.join(prov, "uid", join_type="inner")
        if ship.num_rows != sel.num_rows:
            missing = sorted(set(sel["uid"].to_pylist()) - set(ship["uid"].to_pylist()))
            raise KeyError(f"{len(missing)} selected uids have no accepted ingest record, e.g. {missing[:3]}")
    clusters = rundir.cluster_rows(run, where)
    if clusters is not None:  # joined by row number: Arrow's join carries no list columns
        rows = pa.table({"uid": clusters["uid"], "_row": pa.array(range(len(clusters)), pa.int64())})
        ship = ship.join(rows, "uid", join_type="left outer")
        ids = pc.take(clusters["cluster_ids"], ship["_row"])
        ship = ship.drop_columns(["_row"]).append_column("cluster_ids", ids)
    else:
        ship = ship.append_column("cluster_ids", pa.nulls(len(ship), pa.list_(pa.int64())))
    parts = [ship]
    seeds = rundir.selection(run, "seeds", where=where)
    if seeds is not None and seeds.num_rows:
        rec = uidranges.read_files(seed_files, _RECORD_COLUMNS, where)
        rec = rec.take(rundir.first_by_source(rec, ("blob_run", "uid")))
        prov = [json.dumps({"method": "seed", "seed_set": s}) for s in seeds["seed_set"].to_pylist()]
        want = pa.table({"uid": seeds["uid"], "blob_run": seeds["run"], "retrieval": pa.array(prov, pa.string())})
        got = rec.drop_columns(["detail"]).join(want, ["uid", "blob_run"], join_type="inner")
        if got.num_rows != want.num_rows:
            raise KeyError(f"{want.num_rows - got.num_rows} shipped seeds have no accepted record in their seed run")
        got = got.append_column("detail", pa.nulls(len(got), pa.string()))  # as before: no face boxes for seeds
        parts.append(got.append_column("cluster_ids", pa.nulls(len(got), pa.list_(pa.int64()))))
    table = pa.concat_tables([p.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA) for p in parts])
    table = table.sort_by([("uid", "ascending")])
    durable.write_parquet(out, table, row_group_size=uidranges.GROUP_ROWS)
    return {"rows": len(table), "sha256": durable.file_digest(out)["sha256"]}


def read_rows(slices) -> list[dict]:
    """The plan rows of a shard's slices (only the row groups that hold them are read)."""
    rows = []
    for path, lo, hi in slices:
        pf = pq.ParquetFile(path)
        groups, first, offset = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < hi and offset + n > lo:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        t = pf.read_row_groups(groups)
        rows += t.slice(lo - first, hi - lo).to_pylist()
    return rows


def read_blobs(rows: list[dict]) -> dict[str, bytes]:
    """uid -> bytes of plan rows, from each row's blobs file only."""
    where: dict[str, list[str]] = {}
    for r in rows:
        where.setdefault(r["blob_file"], []).append(r["uid"])
    out: dict[str, bytes] = {}
    for path, uids in sorted(where.items()):
        out.update(rundir.read_blob_file(Path(path), uids))
    if missing := sorted({r["uid"] for r in rows} - out.keys()):
        raise KeyError(f"{len(missing)} shipped uids have no blob in their ingest partition, e.g. {missing[:3]}")
    return out
