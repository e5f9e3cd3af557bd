"""The ledger: one row per input, written as Parquet parts in parallel, checked by `lvd verify`.

The ledger has one row per input (loose file, tar member, Parquet row): every input is in
exactly one status with its reason. Precedence: `rejected` (ingest), `duplicate` (exact copy,
pHash or embedding group; reason says which), `decontaminated` (its duplicate component touches
an eval-set image: reason = the eval set's name, `duplicate_of` = the uid of the eval image it
matched (in RUN/eval/<name>), `distance` = 1 - cosine; the column is reused rather than adding
one, so the schema stays part 1's), then, once shards are written, `sharded` (in
RUN/shards/manifest.parquet) or `unselected` (kept by dedup but not picked by retrieval).
`accepted` remains only for runs stopped before the shard stage. Duplicates of a decontaminated
image keep status `duplicate`. Of the copies of one uid, the first by source order is kept.

Layout (`rundir.ledger_path`): `RUN/ledger/part-NNNNNN.parquet`, one part per ingest partition
(its inputs, sorted by source), and `RUN/ledger/_done.json` written last (each part's rows,
bytes and ingest fingerprint). A ledger without its done-marker is never read as complete; a
run folder from before the partitioned ledger has `RUN/ledger.parquet`, which is still read.
`read_ledger` returns the whole ledger as one table sorted by source, equal to what the
single-process `build_ledger` gives (the reference the tests compare against).

Writing (`write_parts`) runs three rounds of Ray tasks, none holding more than its share:
1. per ingest partition: its accepted (uid, source) pairs, sorted by uid, to a work file;
2. per uid range (sized by `range_rows`, cut at sampled uids): the work files filtered to the
   range (row-group statistics skip the rest) give each uid's later copies (exact duplicates);
3. per ingest partition: its part, joining the global stages' outputs (duplicate groups,
   decontamination, the shard manifest, the later copies) filtered to the partition's uids.

`verify_run` checks in parallel the same way: per part (every input of its ingest partition
exactly once, known statuses, rejections as ingest made them, duplicates with a target and a
reason), then per uid range (kept uids unique, every duplicate pointing at a kept uid, sharded
uids against the manifest); findings are merged into one report (counts and the first few).
A range task reads the uid columns of every part filtered to its range: memory is its share,
reads are (parts x ranges) column scans, a few per worker at the default `range_rows`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd import durable
from lvd.curation import rundir, uidranges
from lvd.curation.rundir import ingest_manifests, read_ingest  # noqa: F401 -- the ledger's API

STATUSES = ("accepted", "duplicate", "rejected", "decontaminated", "unselected", "sharded")
KEPT = ("accepted", "decontaminated", "unselected", "sharded")  # the first row of a uid dedup kept
LEDGER_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("uid", pa.string()),
        ("duplicate_of", pa.string()),
        ("distance", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
# Appended when ingest recorded it (runs since pool hygiene): JSON of a hygiene rejection's
# rule or measured value, an accepted image's face boxes and NSFW score (lvd.curation.hygiene).
DETAIL_FIELD = pa.field("detail", pa.string())
INGEST_COLUMNS = ["source", "status", "reason", "uid", "width", "height"]
DONE = "_done.json"  # the ledger's done-marker, written after every part
WORK = "_work"  # round 1-2 scratch files, removed once the ledger is done
RANGE_ROWS = 2_000_000  # rows per uid-range task (copies and verify): about 300 MB of Python strings
FORMAT = 1


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


# ---------------------------------------------------------------- the single-process reference


def read_duplicates(run_dir: Path, uids=None) -> dict[str, tuple[str, str, float]]:
    """uid -> (representative uid, method, distance) from the final duplicate groups (only
    `uids` when given)."""
    if (table := rundir.duplicates(run_dir, uids)) is None:
        return {}
    t = table.to_pydict()
    return {u: (rep, m, float(d)) for u, rep, m, d in zip(t["uid"], t["duplicate_of"], t["method"], t["distance"])}


def read_decontaminated(run_dir: Path, uids=None) -> dict[str, tuple[str, str, float]]:
    """uid -> (eval set, matched eval uid, distance = 1 - cosine) from the decontam stage."""
    if (table := rundir.decontaminated(run_dir, uids)) is None:
        return {}
    t = table.to_pydict()
    return {
        u: (e, m, 1.0 - float(c)) for u, e, m, c in zip(t["uid"], t["eval_set"], t["matched_eval_uid"], t["similarity"])
    }


def read_shipped(run_dir: Path, uids=None) -> set[str] | None:
    """uids in the run's manifest (only `uids` when given); None when there is none."""
    path = rundir.manifest_path(run_dir)
    if not path.exists():
        return None
    return set(pq.read_table(path, columns=["uid"], filters=_isin("uid", uids))["uid"].to_pylist())


def _isin(column: str, values) -> pc.Expression | None:
    return None if values is None else pc.field(column).isin(pa.array(sorted(set(values)), pa.string()))


def _final_status(uid: str, dec: dict, shipped: set[str] | None) -> tuple[str, str | None, str | None, float | None]:
    """(status, reason, duplicate_of, distance) of the kept row of a uid (see module doc)."""
    if uid in dec:
        name, matched, dist = dec[uid]
        return "decontaminated", name, matched, dist
    if shipped is None:
        return "accepted", None, None, None
    return ("sharded" if uid in shipped else "unselected"), None, None, None


def _has_detail(run_dir: Path) -> bool:
    paths = ingest_manifests(run_dir)
    return bool(paths) and "detail" in pq.read_schema(paths[0]).names  # runs before hygiene have none


def _schema(detail: bool) -> pa.Schema:
    return LEDGER_SCHEMA.append(DETAIL_FIELD) if detail else LEDGER_SCHEMA


def _resolve(rec: dict, later: set[str], near: dict, dec: dict, shipped: set[str] | None, schema) -> pa.Table:
    """Ledger rows from ingest records sorted by source. `later`: sources of exact copies that
    are not the first of their uid (None: decide by first appearance in `rec`, the whole pool)."""
    n = len(rec["source"])
    status, reason = list(rec["status"]), list(rec["reason"])
    dup_of: list[str | None] = [None] * n
    distance: list[float | None] = [None] * n
    first_of_uid: set[str] = set()
    for i in range(n):
        if status[i] != "accepted":
            continue
        uid = rec["uid"][i]
        if uid in near:  # every copy of a non-representative uid points at the representative
            dup_of[i], reason[i], distance[i] = near[uid]
            status[i] = "duplicate"
        elif _later_copy(rec["source"][i], uid, later, first_of_uid):
            status[i], reason[i], dup_of[i], distance[i] = "duplicate", "exact", uid, 0.0
        else:
            first_of_uid.add(uid)
            status[i], reason[i], dup_of[i], distance[i] = _final_status(uid, dec, shipped)
    cols = dict(rec, status=status, reason=reason, duplicate_of=dup_of, distance=distance)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def _later_copy(source: str, uid: str, later: set[str] | None, first_of_uid: set[str]) -> bool:
    """An exact copy after the first of its uid: from the global round 2 when given, else by
    first appearance (rows in source order)."""
    return source in later if later is not None else uid in first_of_uid


def build_ledger(run_dir: Path) -> pa.Table:
    """The whole ledger in one process (the reference `write_parts` is tested against)."""
    detail = _has_detail(run_dir)
    rec = read_ingest(run_dir, INGEST_COLUMNS + (["detail"] if detail else []))
    rec = rec.sort_by([("source", "ascending")]).to_pydict()
    return _resolve(
        rec, None, read_duplicates(run_dir), read_decontaminated(run_dir), read_shipped(run_dir), _schema(detail)
    )


# ---------------------------------------------------------------- Ray plumbing


# ---------------------------------------------------------------- writing, round by round


def _ingest_records(run_dir: str, main_file: str, columns: list[str]) -> pa.Table:
    """One ingest partition's records, the per-domain cap applied."""
    return rundir.apply_caps(Path(run_dir), pq.read_table(main_file, columns=columns))


def _copy_keys(run_dir: str, index: int, main_file: str, out: str) -> dict:
    """Round 1: the partition's accepted (uid, source), sorted by uid, as a work file."""
    t = _ingest_records(run_dir, main_file, ["source", "status", "uid"])
    t = t.filter(pc.equal(t["status"], "accepted")).select(["uid", "source"])
    t = t.sort_by([("uid", "ascending"), ("source", "ascending")])
    t = t.append_column("part", pa.array([index] * len(t), pa.int32()))
    pq.write_table(t, out, row_group_size=uidranges.GROUP_ROWS)
    return {"rows": len(t), "sample": uidranges.sample(t["uid"].to_pylist())}


def _later_copies(key_files: list[str], lo: str | None, hi: str | None, out: str) -> int:
    """Round 2: sources (with their partition) of every copy of a uid after its first by
    source order, for the uids in [lo, hi)."""
    t = uidranges.read_files(key_files, ["uid", "source", "part"], uidranges.in_range("uid", lo, hi))
    t = t.sort_by([("uid", "ascending"), ("source", "ascending")])
    uids = t["uid"].to_pylist()
    later = [i for i in range(1, len(uids)) if uids[i] == uids[i - 1]]
    t = t.take(pa.array(later, pa.int64())).sort_by([("part", "ascending")])
    pq.write_table(t.select(["part", "source"]), out, row_group_size=uidranges.GROUP_ROWS)
    return len(t)


def _write_part(run_dir: str, index: int, main_file: str, later_files: list[str], out: str, detail: bool) -> dict:
    """Round 3: the ledger part of one ingest partition, joined by uid with the global stages'
    outputs read only for the partition's uids; written durably."""
    run = Path(run_dir)
    rec = _ingest_records(run_dir, main_file, INGEST_COLUMNS + (["detail"] if detail else []))
    rec = rec.sort_by([("source", "ascending")])
    uids = pc.unique(rec.filter(pc.equal(rec["status"], "accepted"))["uid"]).to_pylist()
    later = set(uidranges.read_files(later_files, ["source"], pc.field("part") == index)["source"].to_pylist())
    table = _resolve(
        rec.to_pydict(),
        later,
        read_duplicates(run, uids),
        read_decontaminated(run, uids),
        read_shipped(run, uids),
        _schema(detail),
    )
    durable.write_parquet(out, table)
    counts = Counter(zip(table["status"].to_pylist(), table["reason"].to_pylist()))
    return {"rows": len(table), "bytes": Path(out).stat().st_size, "counts": counts}


@dataclass(frozen=True)
class LedgerSummary:
    """What `write_parts` wrote: parts, rows, and rows per (status, reason)."""

    parts: int
    rows: int
    counts: dict[tuple[str, str | None], int]

    @property
    def by_status(self) -> dict[str, int]:
        out: Counter = Counter()
        for (status, _), n in self.counts.items():
            out[status] += n
        return dict(sorted(out.items()))

    def count_rows(self) -> list[dict]:
        """[{status, reason, count}] sorted (reason '(none)' when none), for a report table."""
        rows = Counter({(s, r or "(none)"): n for (s, r), n in self.counts.items()})
        return [{"status": s, "reason": r, "count": n} for (s, r), n in sorted(rows.items())]


def write_parts(run_dir: Path, *, range_rows: int = RANGE_ROWS) -> LedgerSummary:
    """Write `RUN/ledger/` (see the module doc) with Ray tasks; the done-marker goes last, so a
    killed writer leaves a ledger that readers refuse as incomplete. Returns counts only."""
    run_dir = Path(run_dir)
    folder = rundir.ledger_path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).unlink(missing_ok=True)  # from here until the marker: not a ledger
    work = folder / WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    markers = rundir.ingest_markers(run_dir)
    if not markers:
        raise FileNotFoundError(f"no done ingest partitions under {run_dir}: run ingest first")
    mains = dict(zip(sorted(markers), ingest_manifests(run_dir)))
    keys = {i: str(work / f"keys-{i:06d}.parquet") for i in mains}
    got = uidranges.ray_map(_copy_keys, [(str(run_dir), i, str(mains[i]), keys[i]) for i in mains])
    accepted = sum(g["rows"] for g in got)
    ranges = uidranges.ranges([u for g in got for u in g["sample"]], math.ceil(accepted / range_rows))
    later = [str(work / f"later-{r:06d}.parquet") for r in range(len(ranges))]
    uidranges.ray_map(_later_copies, [(list(keys.values()), lo, hi, out) for (lo, hi), out in zip(ranges, later)])
    detail = _has_detail(run_dir)
    jobs = [(str(run_dir), i, str(mains[i]), later, str(folder / part_name(i)), detail) for i in mains]
    parts = dict(zip(mains, uidranges.ray_map(_write_part, jobs)))
    for stray in folder.glob("part-*.parquet"):  # parts of partitions an earlier run had
        if stray.name not in {part_name(i) for i in mains}:
            stray.unlink()
    marker = {
        "format": FORMAT,
        "rows": sum(p["rows"] for p in parts.values()),
        "parts": {
            part_name(i): {"index": i, "rows": p["rows"], "bytes": p["bytes"], "ingest": markers[i]["fingerprint"]}
            for i, p in parts.items()
        },
    }
    durable.write_bytes(folder / DONE, json.dumps(marker, indent=1).encode())
    shutil.rmtree(work, ignore_errors=True)
    legacy_ledger(run_dir).unlink(missing_ok=True)  # one ledger per run folder
    counts: Counter = Counter()
    for p in parts.values():
        counts.update(p["counts"])
    return LedgerSummary(parts=len(parts), rows=marker["rows"], counts=dict(counts))


def write_ledger(run_dir: Path, **kw) -> pa.Table:
    """`write_parts`, then the whole ledger read back as one table (the API for small runs;
    the flow keeps to `write_parts`' counts)."""
    write_parts(run_dir, **kw)
    return read_ledger(run_dir)


# ---------------------------------------------------------------- reading


def legacy_ledger(run_dir: Path) -> Path:
    """`RUN/ledger.parquet`: the one-file ledger of runs before the partitioned one."""
    return Path(run_dir) / rundir.LEGACY_LEDGER


def read_marker(run_dir: Path) -> dict | None:
    path = rundir.ledger_path(run_dir) / DONE
    return json.loads(path.read_text()) if path.exists() else None


def has_ledger(run_dir: Path) -> bool:
    """A complete ledger: the partitioned one's done-marker, or an old single file."""
    return read_marker(run_dir) is not None or legacy_ledger(run_dir).exists()


def ledger_files(run_dir: Path) -> list[Path]:
    """The Parquet files of a complete ledger (parts in order, or the old single file)."""
    if (marker := read_marker(run_dir)) is not None:
        return [rundir.ledger_path(run_dir) / name for name in sorted(marker["parts"])]
    if legacy_ledger(run_dir).exists():
        return [legacy_ledger(run_dir)]
    raise FileNotFoundError(
        f"{rundir.ledger_path(run_dir)}: no complete ledger (no {DONE}; its writer did not finish): "
        "run `lvd curate` again with the same --out to write it"
    )


def read_ledger(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The whole ledger as one table sorted by source (parts or the old single file)."""
    tables = [pq.read_table(p, columns=columns) for p in ledger_files(run_dir)]
    table = pa.concat_tables(tables)
    return table.sort_by([("source", "ascending")]) if "source" in table.column_names else table


def sub_runs(run_dir: Path, kinds=rundir.SUB_RUNS) -> list[Path]:
    """Seed / eval-set run folders under `run_dir` that have a complete ledger."""
    return sorted(p for kind in kinds for p in Path(run_dir).glob(f"{kind}/*") if has_ledger(p))


# ---------------------------------------------------------------- verify


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """Counts per status and reason, and every broken invariant in words."""

    run_dir: Path
    inputs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


Finding = tuple[str, list]  # (what is wrong, the offending sources or uids)
Findings = dict[str, tuple[int, list[str]]]  # what -> (how many, the first few): what a task returns


def _compact(findings: list[Finding], into: Findings | None = None) -> Findings:
    """Merge findings (or other tasks' compacted findings) into counts and the first three items."""
    out = dict(into or {})
    for what, items in findings:
        n, first = (len(items), list(items)) if isinstance(items, list) else items
        if n:
            had_n, had = out.get(what, (0, []))
            out[what] = (had_n + n, sorted(set(had) | set(map(str, first)))[:3])
    return out


def _say(what: str, n: int, first: list[str]) -> str:
    more = f" (+{n - len(first)} more)" if n > len(first) else ""
    return f"{n} {what}: {', '.join(first)}{more}"


def check_sources(ingest: dict, led: dict) -> list[Finding]:
    """Every ingest record appears exactly once in the ledger, and nothing else does."""
    want, have = Counter(ingest["source"]), Counter(led["source"])
    return [
        ("inputs missing from the ledger", list((want - have).elements())),
        ("ledger rows match no input", list((have - want).elements())),
        ("sources counted more than once", [s for s, c in have.items() if c > 1]),
    ]


def _rejection(status: str, reason: str | None) -> str | None:
    return reason if status == "rejected" else None


def check_statuses(ingest: dict, led: dict, near: set[str] = frozenset()) -> list[Finding]:
    """Known statuses only; rejections and their reasons agree with ingest; a uid in the
    run's duplicate groups (`near`) is never kept."""
    rejection = dict(zip(ingest["source"], zip(ingest["status"], ingest["reason"])))
    rows = list(zip(led["source"], led["status"], led["reason"], led["uid"]))
    return [
        ("rows with unknown status", [st for _, st, _, _ in rows if st not in STATUSES]),
        (
            "rows whose rejection disagrees with ingest",
            [s for s, st, r, _ in rows if s in rejection and _rejection(st, r) != _rejection(*rejection[s])],
        ),
        ("rows kept although their uid is a near-duplicate", [s for s, st, _, u in rows if st in KEPT and u in near]),
    ]


def check_duplicate_rows(led: dict) -> list[Finding]:
    """A duplicate names what it duplicates and why (that the target is kept: `check_kept`)."""
    rows = zip(led["source"], led["status"], led["duplicate_of"], led["reason"])
    return [
        (
            "duplicates not pointing at an accepted uid",
            [s for s, st, d, r in rows if st == "duplicate" and not (d and r)],
        )
    ]


def check_kept(own: dict, dups: dict) -> list[Finding]:
    """Kept uids are unique and every duplicate points at one. `own`: every row whose uid is in
    a range; `dups`: every duplicate row whose target is in it (the whole ledger: one range)."""
    kept = [u for u, st in zip(own["uid"], own["status"]) if st in KEPT]
    kept_set = set(kept)
    return [
        ("uids accepted more than once", [u for u, c in Counter(kept).items() if c > 1]),
        (
            "duplicates not pointing at an accepted uid",
            [s for s, d in zip(dups["source"], dups["duplicate_of"]) if d not in kept_set],
        ),
    ]


def check_shipped(led: dict, manifest: list[str] | None) -> list[Finding]:
    """Sharded uids and manifest uids are the same set, each once; nothing removed ships.
    `led`: uid and status of the pool's and the seed runs' rows (shipped seeds are sharded)."""
    rows = list(zip(led["uid"], led["status"]))
    sharded = [u for u, st in rows if st == "sharded"]
    if manifest is None:
        return [("rows are sharded but there is no shards/manifest.parquet", sharded)]
    kept = {u for u, st in rows if st in KEPT}
    removed = {u for u, st in rows if st in ("duplicate", "decontaminated", "rejected")} - kept
    removed |= {u for u, st in rows if st == "decontaminated"}
    shipped = set(manifest)
    bad = removed & shipped
    return [
        ("uids appear more than once in the manifest", [u for u, c in Counter(manifest).items() if c > 1]),
        ("sharded uids are not in the manifest", sorted(set(sharded) - shipped)),
        ("duplicate, decontaminated or rejected uids are in the shards", sorted(bad)),
        ("manifest uids are not sharded in the ledger", sorted(shipped - set(sharded) - bad)),
    ]


LEDGER_CHECK_COLUMNS = ["source", "status", "reason", "uid", "duplicate_of"]


def _verify_part(run_dir: str, ingest_files: list[str], part_file: str, expected_bytes: int | None) -> dict:
    """Per-part checks (a Ray task): the part against its ingest partition(s)."""
    ingest = pa.concat_tables([_ingest_records(run_dir, f, ["source", "status", "reason"]) for f in ingest_files])
    ingest = ingest.to_pydict()
    name = Path(part_file).name
    try:
        led = pq.read_table(part_file, columns=LEDGER_CHECK_COLUMNS).to_pydict()
    except (OSError, pa.ArrowException) as e:
        findings = _compact([("ledger parts cannot be read", [f"{name} ({e})"])])
        return {"findings": findings, "inputs": len(ingest["source"]), "readable": False}
    near = set(read_duplicates(Path(run_dir), [u for u in led["uid"] if u]))
    findings = check_sources(ingest, led) + check_statuses(ingest, led, near) + check_duplicate_rows(led)
    if expected_bytes is not None and Path(part_file).stat().st_size != expected_bytes:
        findings.append(("ledger parts changed after the ledger was written (size differs from _done.json)", [name]))
    kept = sorted(u for u, st in zip(led["uid"], led["status"]) if st in KEPT)
    return {
        "findings": _compact(findings),
        "inputs": len(ingest["source"]),
        "by_status": Counter(led["status"]),
        "by_reason": Counter(f"{st}:{r}" for st, r in zip(led["status"], led["reason"]) if r),
        "sample": uidranges.sample(kept),
        "readable": True,
    }


def _verify_range(part_files: list[str], seed_files: list[str], manifest: str | None, lo, hi, shipping: bool) -> dict:
    """Cross-part checks (a Ray task) for the uids in [lo, hi): read filtered to the range."""
    in_range = uidranges.in_range("uid", lo, hi)
    dup_in_range = (pc.field("status") == "duplicate") & uidranges.in_range("duplicate_of", lo, hi)
    t = uidranges.read_files(part_files, ["source", "uid", "status", "duplicate_of"], in_range | dup_in_range)
    own, dups = t.filter(in_range).to_pydict(), t.filter(dup_in_range).to_pydict()
    findings = check_kept(own, dups)
    if shipping:
        seeds = uidranges.read_files(seed_files, ["uid", "status"], in_range).to_pydict()
        both = {c: own[c] + seeds[c] for c in ("uid", "status")}
        try:
            uids = None if manifest is None else uidranges.read_files([manifest], ["uid"], in_range)["uid"].to_pylist()
        except (OSError, pa.ArrowException) as e:
            return {"findings": _compact(findings + [("shard manifests cannot be read", [f"{manifest} ({e})"])])}
        findings += check_shipped(both, uids)
    return {"findings": _compact(findings)}


def _part_jobs(run_dir: Path, mains: dict[int, Path], marker: dict | None) -> tuple[list[tuple], list[Finding]]:
    """`_verify_part` jobs, and the parts missing from (or extra in) the done-marker."""
    if marker is None:  # the old single file: one part holding every input
        return [(str(run_dir), [str(p) for p in mains.values()], str(legacy_ledger(run_dir)), None)], []
    folder = rundir.ledger_path(run_dir)
    parts = {v["index"]: (name, v["bytes"]) for name, v in marker["parts"].items()}
    jobs = [(str(run_dir), [str(mains[i])], str(folder / n), b) for i, (n, b) in sorted(parts.items()) if i in mains]
    return jobs, [
        ("ingest partitions without a ledger part", [part_name(i) for i in mains if i not in parts]),
        ("ledger parts without an ingest partition", [n for i, (n, _) in parts.items() if i not in mains]),
    ]


def verify_run(run_dir: Path | str, *, sub_run: bool | None = None, range_rows: int = RANGE_ROWS) -> VerifyReport:
    """Check a run in parallel: every input once in one status; shards against manifest and ledger.

    `sub_run`: a seed / eval-set run inside a top run (default: detected from its place,
    RUN/seeds/<name> or RUN/eval/<name>); its shipping is checked by the top run."""
    run_dir = Path(run_dir)
    if sub_run is None:
        sub_run = rundir.is_sub_run(run_dir)
    try:
        ledger_files(run_dir)
        mains = dict(zip(sorted(rundir.ingest_markers(run_dir)), ingest_manifests(run_dir)))
        if not mains:
            raise FileNotFoundError(f"no done ingest partitions under {run_dir}")
    except (FileNotFoundError, OSError, ValueError) as e:
        return VerifyReport(run_dir=run_dir, problems=[f"cannot read run: {e}"])
    marker = read_marker(run_dir)
    jobs, findings = _part_jobs(run_dir, mains, marker)
    parts = uidranges.ray_map(_verify_part, jobs)
    rows = sum(sum(p.get("by_status", {}).values()) for p in parts)
    ranges = uidranges.ranges([u for p in parts for u in p.get("sample", [])], math.ceil(rows / range_rows))
    manifest = rundir.manifest_path(run_dir)
    manifest_file = str(manifest) if manifest.exists() else None
    seed_files = [] if sub_run else [str(f) for s in sub_runs(run_dir, ("seeds",)) for f in ledger_files(s)]
    readable = [job[2] for job, p in zip(jobs, parts) if p["readable"]]  # unreadable ones are reported already
    range_jobs = [(readable, seed_files, manifest_file, lo, hi, not sub_run) for lo, hi in ranges]
    merged = _compact(findings)
    for result in parts + uidranges.ray_map(_verify_range, range_jobs):
        merged = _compact(list(result["findings"].items()), merged)
    problems = [_say(what, n, first) for what, (n, first) in merged.items()]
    inputs = sum(p["inputs"] for p in parts)
    if rows != inputs:
        problems.append(f"{inputs} inputs but {rows} ledger rows")
    if not sub_run and manifest_file:  # every tar against the manifest: checksums, keys, uids, images
        from lvd.curation.shards.check import check_shards

        problems += check_shards(rundir.shards_dir(run_dir)).problems
    if not sub_run:
        problems += _sub_runs(run_dir)
    return VerifyReport(
        run_dir=run_dir,
        inputs=inputs,
        by_status=dict(sorted(sum((Counter(p.get("by_status", {})) for p in parts), Counter()).items())),
        by_reason=dict(sorted(sum((Counter(p.get("by_reason", {})) for p in parts), Counter()).items())),
        problems=problems,
    )


def _sub_runs(run_dir: Path) -> list[str]:
    """Seed and eval-set runs (RUN/seeds/<name>, RUN/eval/<name>) have their own ledgers."""
    problems = []
    for sub in sub_runs(run_dir):
        rel = sub.relative_to(run_dir)
        problems += [f"{rel}: {p}" for p in verify_run(sub, sub_run=True).problems]
    return problems


def format_report(report: VerifyReport) -> str:
    """A short human summary: counts per status and reason, then problems."""
    lines = [f"run {report.run_dir}: {report.inputs} inputs"]
    lines += [f"  {status:<10} {n}" for status, n in report.by_status.items()]
    lines += [f"    {key:<28} {n}" for key, n in report.by_reason.items()]
    if report.ok:
        lines.append("OK: every input is accounted for exactly once (and every shard matches)")
    else:
        lines += ["BROKEN:"] + [f"  - {p}" for p in report.problems]
    return "\n".join(lines)
