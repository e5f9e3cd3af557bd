"""Build `RUN/ledger.parquet` from the stage manifests and check the accounting invariant.

The ledger has one row per input (loose file, tar member, Parquet row), sorted by `source`:
every input is in exactly one status with its reason. Precedence: `rejected` (ingest),
`duplicate` (exact copy, pHash or embedding group; reason says which), `decontaminated`
(its duplicate component touches an eval-set image: reason = the eval set's name,
`duplicate_of` = the uid of the eval image it matched (in RUN/eval/<name>), `distance` =
1 - cosine; the column is reused rather than adding one, so the schema stays part 1's), then, once shards are written, `sharded`
(in RUN/shards/manifest.parquet) or `unselected` (kept by dedup but not picked by retrieval).
`accepted` remains only for runs stopped before the shard stage. Duplicates of a
decontaminated image keep status `duplicate`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lvd.curation import rundir
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


def read_duplicates(run_dir: Path) -> dict[str, tuple[str, str, float]]:
    """uid -> (representative uid, method, distance) from the final duplicate groups."""
    if (table := rundir.duplicates(run_dir)) is None:
        return {}
    t = table.to_pydict()
    return {u: (rep, m, float(d)) for u, rep, m, d in zip(t["uid"], t["duplicate_of"], t["method"], t["distance"])}


def read_decontaminated(run_dir: Path) -> dict[str, tuple[str, str, float]]:
    """uid -> (eval set, matched eval uid, distance = 1 - cosine) from the decontam stage."""
    if (table := rundir.decontaminated(run_dir)) is None:
        return {}
    t = table.to_pydict()
    return {
        u: (e, m, 1.0 - float(c)) for u, e, m, c in zip(t["uid"], t["eval_set"], t["matched_eval_uid"], t["similarity"])
    }


def read_shipped(run_dir: Path) -> set[str] | None:
    """uids in the run's manifest; None when there is none (shard stage not done)."""
    path = rundir.manifest_path(run_dir)
    return set(pq.read_table(path, columns=["uid"])["uid"].to_pylist()) if path.exists() else None


def _final_status(uid: str, dec: dict, shipped: set[str] | None) -> tuple[str, str | None, str | None, float | None]:
    """(status, reason, duplicate_of, distance) of the kept row of a uid (see module doc)."""
    if uid in dec:
        name, matched, dist = dec[uid]
        return "decontaminated", name, matched, dist
    if shipped is None:
        return "accepted", None, None, None
    return ("sharded" if uid in shipped else "unselected"), None, None, None


def build_ledger(run_dir: Path) -> pa.Table:
    """One row per ingest record: near-duplicates first, then exact copies by source order."""
    paths = ingest_manifests(run_dir)
    has_detail = bool(paths) and "detail" in pq.read_schema(paths[0]).names  # runs before hygiene have none
    rec = read_ingest(run_dir, INGEST_COLUMNS + (["detail"] if has_detail else []))
    rec = rec.sort_by([("source", "ascending")]).to_pydict()
    near = read_duplicates(run_dir)
    dec, shipped = read_decontaminated(run_dir), read_shipped(run_dir)
    n = len(rec["source"])
    status, reason = list(rec["status"]), list(rec["reason"])
    dup_of: list[str | None] = [None] * n
    distance: list[float | None] = [None] * n
    first_of_uid: dict[str, str] = {}
    for i in range(n):
        if status[i] != "accepted":
            continue
        uid = rec["uid"][i]
        if uid in near:  # every copy of a non-representative uid points at the representative
            dup_of[i], reason[i], distance[i] = near[uid]
            status[i] = "duplicate"
        elif uid in first_of_uid:  # rows are in source order, so the first copy stays
            status[i], reason[i], dup_of[i], distance[i] = "duplicate", "exact", uid, 0.0
        else:
            first_of_uid[uid] = rec["source"][i]
            status[i], reason[i], dup_of[i], distance[i] = _final_status(uid, dec, shipped)
    cols = dict(rec, status=status, reason=reason, duplicate_of=dup_of, distance=distance)
    schema = LEDGER_SCHEMA.append(DETAIL_FIELD) if has_detail else LEDGER_SCHEMA
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def write_ledger(run_dir: Path) -> pa.Table:
    """Build and durably write `RUN/ledger.parquet` (`lvd.durable`); returns the table."""
    from lvd import durable

    table = build_ledger(run_dir)
    durable.write_parquet(rundir.ledger_path(run_dir), table)
    return table


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


@dataclass(frozen=True)
class _Run:
    ingest: dict[str, list]
    ledger: dict[str, list]
    manifest: list[str] | None = None  # uids of RUN/shards/manifest.parquet, rows in order


Check = Callable[[_Run], list[str]]


def _few(items) -> str:
    items = sorted(set(items))
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return ", ".join(map(str, items[:3])) + more


def check_sources(run: _Run) -> list[str]:
    """Every ingest record appears exactly once in the ledger, and nothing else does."""
    want, have = Counter(run.ingest["source"]), Counter(run.ledger["source"])
    problems = []
    if missing := want - have:
        problems.append(f"{sum(missing.values())} inputs missing from the ledger: {_few(missing)}")
    if extra := have - want:
        problems.append(f"{sum(extra.values())} ledger rows match no input: {_few(extra)}")
    if twice := [s for s, c in have.items() if c > 1]:
        problems.append(f"{len(twice)} sources counted more than once: {_few(twice)}")
    return problems


def _rejection(status: str, reason: str | None) -> str | None:
    return reason if status == "rejected" else None


def check_statuses(run: _Run) -> list[str]:
    """Known statuses only; rejections and their reasons agree with ingest."""
    led = run.ledger
    bad = [s for s in led["status"] if s not in STATUSES]
    problems = [f"{len(bad)} rows with unknown status: {_few(bad)}"] if bad else []
    ingest = dict(zip(run.ingest["source"], zip(run.ingest["status"], run.ingest["reason"])))
    wrong = [
        s
        for s, st, r in zip(led["source"], led["status"], led["reason"])
        if s in ingest and _rejection(st, r) != _rejection(*ingest[s])
    ]
    if wrong:
        problems.append(f"{len(wrong)} rows whose rejection disagrees with ingest: {_few(wrong)}")
    return problems


def check_duplicates(run: _Run) -> list[str]:
    """Each duplicate names a kept uid and has a reason; kept uids are unique."""
    led = run.ledger
    accepted = [u for u, st in zip(led["uid"], led["status"]) if st in KEPT]
    accepted_set = set(accepted)
    problems = []
    if twice := [u for u, c in Counter(accepted).items() if c > 1]:
        problems.append(f"{len(twice)} uids accepted more than once: {_few(twice)}")
    dangling = [
        s
        for s, st, d, r in zip(led["source"], led["status"], led["duplicate_of"], led["reason"])
        if st == "duplicate" and (d not in accepted_set or not r)
    ]
    if dangling:
        problems.append(f"{len(dangling)} duplicates not pointing at an accepted uid: {_few(dangling)}")
    return problems


def check_shipped(run: _Run) -> list[str]:
    """Sharded uids and manifest uids are the same set, each once; nothing removed ships."""
    led = run.ledger
    sharded = [u for u, st in zip(led["uid"], led["status"]) if st == "sharded"]
    if run.manifest is None:
        return [f"{len(sharded)} rows are sharded but there is no shards/manifest.parquet"] if sharded else []
    problems = []
    if twice := [u for u, c in Counter(run.manifest).items() if c > 1]:
        problems.append(f"{len(twice)} uids appear more than once in the manifest: {_few(twice)}")
    if missing := set(sharded) - set(run.manifest):
        problems.append(f"{len(missing)} sharded uids are not in the manifest: {_few(missing)}")
    kept = {u for u, st in zip(led["uid"], led["status"]) if st in KEPT}
    removed = {
        u for u, st in zip(led["uid"], led["status"]) if st in ("duplicate", "decontaminated", "rejected")
    } - kept
    removed |= {u for u, st in zip(led["uid"], led["status"]) if st == "decontaminated"}
    if bad := removed & set(run.manifest):
        problems.append(f"{len(bad)} duplicate, decontaminated or rejected uids are in the shards: {_few(bad)}")
    if extra := set(run.manifest) - set(sharded) - bad:
        problems.append(f"{len(extra)} manifest uids are not sharded in the ledger: {_few(extra)}")
    return problems


CHECKS: list[Check] = [check_sources, check_statuses, check_duplicates, check_shipped]


def verify_run(run_dir: Path | str, *, sub_run: bool | None = None) -> VerifyReport:
    """Check a run: every input once in one status; shards against manifest and ledger.

    `sub_run`: a seed / eval-set run inside a top run (default: detected from its place,
    RUN/seeds/<name> or RUN/eval/<name>); its shipping is checked by the top run."""
    run_dir = Path(run_dir)
    if sub_run is None:
        sub_run = rundir.is_sub_run(run_dir)
    path = rundir.ledger_path(run_dir)
    try:
        ledger = pq.read_table(path).to_pydict()
        ingest = read_ingest(run_dir, INGEST_COLUMNS).to_pydict()
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        return VerifyReport(run_dir=run_dir, problems=[f"cannot read run: {e}"])
    if sub_run:  # a seed / eval run: its own accounting; shipping is checked from the top run
        problems = [
            p for check in CHECKS if check is not check_shipped for p in check(_Run(ingest=ingest, ledger=ledger))
        ]
        return VerifyReport(
            run_dir=run_dir,
            inputs=len(ingest["source"]),
            problems=problems,
            by_status=dict(sorted(Counter(ledger["status"]).items())),
        )
    manifest = rundir.manifest_path(run_dir)
    try:
        uids = pq.read_table(manifest, columns=["uid"])["uid"].to_pylist() if manifest.exists() else None
    except (OSError, pa.ArrowException) as e:
        return VerifyReport(run_dir=run_dir, problems=[f"cannot read {manifest}: {e}"])
    seed_ledgers = [pq.read_table(p).to_pydict() for p in sorted(run_dir.glob(f"seeds/*/{rundir.LEDGER}"))]
    both = {c: ledger[c] + [v for sl in seed_ledgers for v in sl[c]] for c in ("uid", "status")}
    problems = [p for check in CHECKS if check is not check_shipped for p in check(_Run(ingest=ingest, ledger=ledger))]
    problems += check_shipped(_Run(ingest=ingest, ledger=both, manifest=uids))  # pool and shipped seeds
    if uids is not None:  # every tar against the manifest: checksums, keys, uids, decodable images
        from lvd.curation.shards.check import check_shards

        problems += check_shards(rundir.shards_dir(run_dir)).problems
    problems += _sub_runs(run_dir)
    by_status = Counter(ledger["status"])
    if sum(by_status.values()) != len(ingest["source"]):
        problems.append(f"{len(ingest['source'])} inputs but {sum(by_status.values())} ledger rows")
    by_reason = Counter(f"{st}:{r}" for st, r in zip(ledger["status"], ledger["reason"]) if r)
    return VerifyReport(
        run_dir=run_dir,
        inputs=len(ingest["source"]),
        by_status=dict(sorted(by_status.items())),
        by_reason=dict(sorted(by_reason.items())),
        problems=problems,
    )


def _sub_runs(run_dir: Path) -> list[str]:
    """Seed and eval-set runs (RUN/seeds/<name>, RUN/eval/<name>) have their own ledgers."""
    problems = []
    for sub in sorted(p for kind in rundir.SUB_RUNS for p in run_dir.glob(f"{kind}/*/{rundir.LEDGER}")):
        rel = sub.parent.relative_to(run_dir)
        problems += [f"{rel}: {p}" for p in verify_run(sub.parent, sub_run=True).problems]
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
