"""The run folder: which stage writes what, and where.

This is the one module that knows the layout of `RUN/`; a stage reads what an earlier stage
wrote through the readers here, never by building the path itself. `STAGES` declares each
stage once (folder, the stages whose outputs it reads, the files it leaves for later ones),
and two things are derived from it: the identity of a stage's input (`input_digest`: the
done-markers of its upstream folders) and which folders a run with other options must drop
(`stale_stages`).

    RUN/
      run.json, .lock            the run's owner record (lvd.runfolder)
      ingest/                    part-N.parquet (one row per input) + part-N.blobs.parquet
                                 (sorted by uid, row groups of ~BLOB_GROUP_BYTES)
      domaincap/                 capped.parquet (--max-per-domain; applied by read_ingest)
      dedup/                     duplicates.parquet (hash groups)
      copyfeat/                  part-N.parquet (local features per accepted image)
      copyembed/ copyvec/        the copy model's markers and vectors (--copy-model)
      copydetect/                duplicates{,.calibration,.stats}.parquet (final groups)
      embed/ vectors/            the embedder's markers and vectors (--embedder)
      decontam/                  decontaminated.parquet
      cluster/                   clusters.parquet, clusters.tree.parquet
      retrieve/                  selection{,.seeds,.counts}.parquet
      shard_parts/ shards/       per-shard parts (and _plan/ while the stage runs: stages.shardplan);
                                 shard-*.tar + manifest.parquet (written last)
      seeds/NAME/ eval/NAME/     sub-runs with the same layout
      ledger/                    part-N.parquet (one row per input) + _done.json last (lvd.curation.ledger);
                                 runs before it: ledger.parquet (still read)
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MARKER_SUFFIX = ".done.json"  # the runner's done-marker (lvd.curation.runner.MARKER_SUFFIX)
BLOBS = "blobs"  # ingest's output of image bytes (part-N.blobs.parquet)
# row groups of a blobs file, in bytes: sorted by uid, a reader of a uid range (a shard: shards
# are cut in uid order) reads only the groups that hold it, not the whole file (which was one
# group: every shard task read every image of the pool)
BLOB_GROUP_BYTES = 1 << 20


@dataclass(frozen=True)
class Stage:
    name: str  # its folder under RUN/
    upstream: tuple[str, ...]  # stages of the same run whose done-markers key its work
    outputs: tuple[str, ...]  # what later stages and the ledger read
    optional: bool = False  # runs only with some options; its folder goes when a run skips it


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", (), ("part-*.parquet", "part-*.blobs.parquet")),
    Stage("domaincap", ("ingest",), ("capped.parquet",)),  # --max-per-domain; read_ingest applies it
    Stage("dedup", ("ingest",), ("duplicates.parquet",)),
    Stage("copyfeat", ("ingest",), ("part-*.parquet",)),
    Stage("embed", ("ingest",), ("../vectors",), optional=True),
    Stage("copyembed", ("ingest",), ("../copyvec",), optional=True),
    Stage("copydetect", ("dedup", "copyfeat"), ("duplicates.parquet", "duplicates.calibration.parquet",
                                                  "duplicates.stats.parquet"), optional=True),
    Stage("decontam", ("copydetect",), ("decontaminated.parquet",), optional=True),
    Stage("cluster", ("dedup", "embed", "copydetect", "decontam"), ("clusters.parquet", "clusters.tree.parquet"),
          optional=True),
    Stage("retrieve", ("cluster", "embed"), ("selection.parquet", "selection.seeds.parquet",
                                             "selection.counts.parquet"), optional=True),
    Stage("shard_parts", ("dedup", "copydetect", "decontam", "retrieve"), ("part-*.parquet",)),
)}  # fmt: skip
VECTORS = {"embed": "vectors", "copyembed": "copyvec"}  # embedding stages keep vectors beside their markers
SHARDS, MANIFEST, LEDGER = "shards", "manifest.parquet", "ledger"
LEGACY_LEDGER = "ledger.parquet"  # the one-file ledger of runs before the partitioned one (read, never written)
SUB_RUNS = ("seeds", "eval")
# ingest columns the duplicate stages never need
NOT_FOR_DEDUP = {"meta", "reason", "format", "nbytes"}


def stage_dir(run_dir: Path, name: str) -> Path:
    if name not in STAGES:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGES)}")
    return Path(run_dir) / name


def vectors_dir(run_dir: Path, stage: str = "embed") -> Path:
    return Path(run_dir) / VECTORS[stage]


def sub_run(run_dir: Path, kind: str, name: str) -> Path:
    """RUN/seeds/NAME or RUN/eval/NAME: a seed or eval set's own run folder."""
    if kind not in SUB_RUNS:
        raise KeyError(f"no sub-run kind {kind!r}; kinds: {', '.join(SUB_RUNS)}")
    return Path(run_dir) / kind / name


def downstream(name: str) -> set[str]:
    """Every stage that reads `name`'s outputs, directly or through another stage."""
    out, todo = set(), [name]
    while todo:
        cur = todo.pop()
        for s in STAGES.values():
            if cur in s.upstream and s.name not in out:
                out.add(s.name)
                todo.append(s.name)
    return out


def stale_stages(will_run: set[str]) -> list[str]:
    """Optional stages a run will not run: an earlier run with other options wrote them, and
    the ledger and the shard stage would still read them. Costly, uid-keyed outputs (vectors,
    features) are kept: a stage that reruns reuses them."""
    return [s.name for s in STAGES.values() if s.optional and s.name not in will_run and s.name not in VECTORS]


# ---------------------------------------------------------------- identities


def markers(stage_dir_: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(stage_dir_).glob(f"*{MARKER_SUFFIX}"))]


def digest(*dirs: Path) -> str:
    """Digest of every done-marker under `dirs`: the identity of what a later stage reads."""
    h = hashlib.sha256()
    for d in dirs:
        for m in sorted(Path(d).glob(f"*{MARKER_SUFFIX}")):
            h.update(f"{d.name}/{m.name}\n".encode() + m.read_bytes())
    return h.hexdigest()


def input_digest(run_dir: Path, name: str, *extra: Path) -> str:
    """The identity of stage `name`'s input: its declared upstream folders of this run, plus
    `extra` folders of other runs (seed or eval sets, proposers)."""
    return digest(*[Path(run_dir) / u for u in STAGES[name].upstream], *extra)


def ingest_markers(run_dir: Path) -> dict[int, dict]:
    """Partition index -> done-marker of every done ingest partition."""
    return {m["index"]: m for m in markers(Path(run_dir) / "ingest")}


def ingest_fingerprint(run_dir: Path) -> str:
    """Digest of every done ingest partition's input and config: dedup's input identity."""
    h = hashlib.sha256()
    for index, m in sorted(ingest_markers(run_dir).items()):
        h.update(f"{index}:{m['fingerprint']}:{m['config_hash']}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- ingest


def ingest_manifests(run_dir: Path) -> list[Path]:
    """The record files of every done ingest partition, in partition order."""
    d = Path(run_dir) / "ingest"
    return [d / m["outputs"]["main"] for _, m in sorted(ingest_markers(run_dir).items())]


def ingest_blob_files(run_dir: Path) -> dict[int, Path]:
    """Partition index -> its blobs file (the bytes of its accepted images)."""
    d = Path(run_dir) / "ingest"
    return {i: d / m["outputs"][BLOBS] for i, m in sorted(ingest_markers(run_dir).items())}


def blob_group_rows(table: pa.Table) -> int:
    """Rows per row group of a blobs table: ~BLOB_GROUP_BYTES each."""
    return max(1, min(1 << 20, BLOB_GROUP_BYTES * table.num_rows // max(1, table.nbytes)))


def read_ingest(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All ingest records of a run, concatenated in partition order, with the per-domain cap's
    rejections applied (RUN/domaincap, `apply_caps`: it needs a global count, so it
    runs after ingest; every reader sees its inputs as rejected `domain_capped`)."""
    paths = ingest_manifests(run_dir)
    if not paths:
        raise FileNotFoundError(f"no done ingest partitions under {Path(run_dir) / 'ingest'}")
    return apply_caps(run_dir, pa.concat_tables([pq.read_table(p, columns=columns) for p in paths]))


def ingested(run_dir: Path, uids) -> set[str]:
    """Those of `uids` that any ingest record of the run has, reading one partition's uid
    column at a time."""
    ask = pa.array(sorted(set(uids)), pa.string())
    found: set[str] = set()
    if len(ask):
        for path in ingest_manifests(run_dir):
            t = pq.read_table(path, columns=["uid"])
            found.update(t.filter(pc.is_in(t["uid"], value_set=ask))["uid"].to_pylist())
    return found


def unique_accepted(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """One row per accepted uid (its first input by source order), in source order: what dedup
    compares; with `columns`, only those are read (the copy stages' drivers need three of the
    ~40 hash columns). No Python object per row: the first of each uid is found by Arrow sorts."""
    names = pq.read_schema(ingest_manifests(run_dir)[0]).names
    wanted = [c for c in names if c not in NOT_FOR_DEDUP] if columns is None else list(columns)
    read = list(dict.fromkeys([*wanted, "uid", "status", "source"]))
    t = read_ingest(run_dir, read)
    t = t.filter(pc.equal(t["status"], "accepted"))
    t = t.take(first_by_source(t)).sort_by([("source", "ascending")])
    return t.select([c for c in wanted if c not in ("status", "source")])


def first_by_source(t: pa.Table, keys: tuple[str, ...] = ("uid",)) -> pa.Array:
    """Row numbers of the first row by source order (then row order) of each `keys` group of
    `t`, ascending; by Arrow sorts, no Python object per row."""
    n = len(t)
    rows = pa.array(range(n), pa.int64())
    if n < 2:
        return rows
    cols = {f"k{j}": t[k] for j, k in enumerate(keys)} | {"source": t["source"], "row": rows}
    order = pa.table(cols).sort_by([(c, "ascending") for c in cols])
    new = None
    for j in range(len(keys)):
        col = order[f"k{j}"].combine_chunks()
        diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
        new = diff if new is None else pc.or_(new, diff)
    firsts = order["row"].combine_chunks().filter(pa.concat_arrays([pa.array([True]), new]))
    return firsts.take(pc.array_sort_indices(firsts))


def read_blobs(run_dir: Path, uids, *, strict: bool = True) -> dict[str, bytes]:
    """uid -> image bytes from the run's ingest blob files, only the uids asked for. A uid
    with no blob raises KeyError, unless `strict=False` (pictures in reports: best effort).
    Only the row groups whose uid min..max holds a uid asked for are read: the files are
    sorted by uid, so a uid range (a shard's) reads its own groups of each file."""
    want = set(uids)
    found: dict[str, bytes] = {}
    for path in ingest_blob_files(run_dir).values():
        if not (left := want - found.keys()):
            break
        found.update(read_blob_file(path, left))
    if strict and (missing := sorted(want - found.keys())):
        raise KeyError(f"{len(missing)} uids have no blob under {Path(run_dir) / 'ingest'}, e.g. {missing[:3]}")
    return found


def read_blob_file(path: Path, uids) -> dict[str, bytes]:
    """uid -> bytes of the `uids` one blobs file holds, reading only the row groups whose uid
    min..max holds one of them."""
    ask = sorted(set(uids))
    pf = pq.ParquetFile(path)
    t = pf.read_row_groups(groups_holding(pf.metadata, ask), columns=["uid", "data"])
    t = t.filter(pc.is_in(t["uid"], pa.array(ask, pa.string())))
    return dict(zip(t["uid"].to_pylist(), t["data"].to_pylist()))


def groups_holding(md: pq.FileMetaData, ask: list[str]) -> list[int]:
    """Row groups of a blobs file whose uid min..max holds one of `ask` (sorted); every group
    when a group has no statistics."""
    col = md.schema.names.index("uid")
    out = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or bisect.bisect_right(ask, st.max) > bisect.bisect_left(ask, st.min):
            out.append(g)
    return out


def cap_path(run_dir: Path) -> Path:
    """The per-domain cap's decisions (`urlfilter.run_domain_cap` writes them)."""
    return Path(run_dir) / "domaincap" / "capped.parquet"


def apply_caps(run_dir: Path, records: pa.Table) -> pa.Table:
    """Ingest `records` with the cap's decisions applied: status `rejected`, reason
    `domain_capped` (and its rule in `detail`, when that column is read). No-op without a cap."""
    path = cap_path(run_dir)
    if not path.exists() or "source" not in records.column_names or "status" not in records.column_names:
        return records
    capped = pq.read_table(path).to_pydict()
    rule_of = dict(zip(capped["source"], capped["rule"]))
    if not rule_of:
        return records
    hit = pc.is_in(records["source"], pa.array(list(rule_of), pa.string()))
    cols = {}
    cols["status"] = pc.if_else(hit, "rejected", records["status"])
    if "reason" in records.column_names:
        cols["reason"] = pc.if_else(hit, "domain_capped", records["reason"])
    if "detail" in records.column_names:
        details = [
            json.dumps({"rule": rule_of[s]}) if s in rule_of else d
            for s, d in zip(records["source"].to_pylist(), records["detail"].to_pylist())
        ]
        cols["detail"] = pa.array(details, pa.string())
    for name, col in cols.items():
        records = records.set_column(records.schema.get_field_index(name), name, col)
    return records


# ---------------------------------------------------------------- duplicates, decontamination


def _table(path: Path, uids=None, where: pc.Expression | None = None) -> pa.Table | None:
    """The table at `path` (None if absent); with `uids`, only their rows, with `where` only
    the rows it keeps (bounded reads: row groups the statistics rule out are skipped)."""
    if not path.exists():
        return None
    wanted = None if uids is None else pc.field("uid").isin(pa.array(list(uids), pa.string()))
    if where is not None:
        wanted = where if wanted is None else wanted & where
    return pq.read_table(path, filters=wanted)


def hash_duplicates(run_dir: Path) -> pa.Table | None:
    """The hash dedup stage's groups (None before it ran)."""
    return _table(Path(run_dir) / "dedup" / "duplicates.parquet")


def duplicates(run_dir: Path, uids=None, where: pc.Expression | None = None) -> pa.Table | None:
    """The run's final duplicate groups: copy detection's when it ran, else hash dedup's
    (only the rows of `uids`, and those `where` keeps, when given)."""
    for stage in ("copydetect", "dedup"):
        if (t := _table(Path(run_dir) / stage / "duplicates.parquet", uids, where)) is not None:
            return t
    return None


def duplicates_file(run_dir: Path) -> Path | None:
    """The file `duplicates` reads (copy detection's, else hash dedup's), for readers that
    stream it in batches (partitioned decontamination); None before any dedup ran."""
    for stage in ("copydetect", "dedup"):
        if (path := Path(run_dir) / stage / "duplicates.parquet").exists():
            return path
    return None


def copydetect_output(run_dir: Path, what: str) -> dict | None:
    """One of copy detection's one-row JSON outputs ('calibration', 'stats'), or None."""
    t = _table(Path(run_dir) / "copydetect" / f"duplicates.{what}.parquet")
    return json.loads(t["json"][0].as_py()) if t is not None else None


def decontaminated(run_dir: Path, uids=None, where: pc.Expression | None = None) -> pa.Table | None:
    return _table(Path(run_dir) / "decontam" / "decontaminated.parquet", uids, where)


def decontaminated_file(run_dir: Path) -> Path | None:
    """The decontamination's table file (None before it ran), for readers that take it in chunks."""
    path = Path(run_dir) / "decontam" / "decontaminated.parquet"
    return path if path.exists() else None


def candidates(run_dir: Path) -> list[str]:
    """uids still in the running after dedup, copy detection and decontamination, sorted."""
    uids = unique_accepted(run_dir, ["uid"])["uid"]  # Arrow: no Python set of the pool's uids
    for t in (duplicates(run_dir), decontaminated(run_dir)):
        if t is not None:
            uids = uids.filter(pc.invert(pc.is_in(uids, value_set=t["uid"].combine_chunks())))
    return uids.take(pc.sort_indices(uids)).to_pylist()


# ---------------------------------------------------------------- selection, shards, ledger


def clusters(run_dir: Path) -> tuple[pa.Table, pa.Table] | None:
    """The cluster stage's table and its tree (None when it did not run)."""
    d = Path(run_dir) / "cluster"
    if (t := _table(d / "clusters.parquet")) is None:
        return None
    return t, pq.read_table(d / "clusters.tree.parquet")


def clusters_files(run_dir: Path) -> tuple[Path, Path] | None:
    """The cluster stage's table and tree files (None when it did not run), for readers that
    take them a chunk at a time (partitioned balanced sampling)."""
    d = Path(run_dir) / "cluster"
    table, tree = d / "clusters.parquet", d / "clusters.tree.parquet"
    return (table, tree) if table.exists() and tree.exists() else None


def cluster_rows(run_dir: Path, where: pc.Expression) -> pa.Table | None:
    """The rows of the cluster stage's table (uid, leaf, score, cluster_ids) `where` keeps."""
    return _table(Path(run_dir) / "cluster" / "clusters.parquet", where=where)


def selection(run_dir: Path, what: str = "", where: pc.Expression | None = None) -> pa.Table | None:
    """retrieve's selection ('' ), its seed provenance ('seeds') or per-seed counts ('counts');
    with `where`, only the rows it keeps."""
    name = f"selection.{what}.parquet" if what else "selection.parquet"
    return _table(Path(run_dir) / "retrieve" / name, where=where)


def shards_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SHARDS


def manifest_path(run_dir: Path) -> Path:
    """A run's shard manifest; a seed set's images ship in the parent run's shards."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == "seeds" and not (run_dir / SHARDS).exists():
        return run_dir.parent.parent / SHARDS / MANIFEST
    return run_dir / SHARDS / MANIFEST


def ledger_path(run_dir: Path) -> Path:
    """The ledger's folder (its parts and done-marker: lvd.curation.ledger)."""
    return Path(run_dir) / LEDGER


def is_sub_run(run_dir: Path) -> bool:
    """A seed or eval set's folder inside a run that has a ledger of its own."""
    run_dir = Path(run_dir)
    top = run_dir.parent.parent
    return run_dir.parent.name in SUB_RUNS and (ledger_path(top).exists() or (top / LEGACY_LEDGER).exists())
