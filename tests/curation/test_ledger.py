"""Ledger: exact copies by source order, near-duplicates by representative, written as parts
in parallel and equal to the single-process reference; verify catches tampering in one part.

Manifests are written by hand here so the expected ledger can be computed by hand.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvd.curation import ledger as lg
from lvd.curation import rundir


@pytest.fixture(autouse=True)
def _ray(ray_local):
    """The ledger writes and checks its parts as Ray tasks on the session's Ray."""


def write_part(run: Path, index: int, rows: list[tuple]) -> None:
    """rows: (source, status, reason, uid, width, height)."""
    d = run / "ingest"
    d.mkdir(parents=True, exist_ok=True)
    cols = list(zip(*rows))
    table = pa.table(
        {
            "source": pa.array(cols[0], pa.string()),
            "status": pa.array(cols[1], pa.string()),
            "reason": pa.array(cols[2], pa.string()),
            "uid": pa.array(cols[3], pa.string()),
            "width": pa.array(cols[4], pa.int32()),
            "height": pa.array(cols[5], pa.int32()),
        }
    )
    name = f"part-{index:06d}.parquet"
    pq.write_table(table, d / name)
    marker = {"index": index, "fingerprint": "f", "config_hash": "c", "outputs": {"main": name}}
    (d / f"part-{index:06d}.done.json").write_text(json.dumps(marker))


def write_dups(run: Path, rows: list[tuple]) -> None:
    (run / "dedup").mkdir(parents=True, exist_ok=True)
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    pq.write_table(
        pa.table(
            {
                "uid": pa.array(cols[0], pa.string()),
                "duplicate_of": pa.array(cols[1], pa.string()),
                "method": pa.array(cols[2], pa.string()),
                "distance": pa.array(cols[3], pa.float64()),
            }
        ),
        run / "dedup" / "duplicates.parquet",
    )


@pytest.fixture
def run(tmp_path) -> Path:
    # Partition 1 holds sources sorting before partition 0's, to check the global sort.
    write_part(
        tmp_path,
        0,
        [
            ("d/z.png", "accepted", None, "A", 10, 10),  # later copy of A -> exact dup of A
            ("d/y.png", "rejected", "corrupt", "X", 0, 0),
            ("d/w.png", "accepted", None, "C", 30, 30),  # near-dup of B
        ],
    )
    write_part(
        tmp_path,
        1,
        [
            ("a.tar::m1.jpg", "accepted", None, "A", 10, 10),  # first copy of A stays
            ("a.tar::m2", "rejected", "tar_link", None, 0, 0),
            ("b.parquet::0", "accepted", None, "B", 20, 20),
            ("b.parquet::1", "accepted", None, "C", 30, 30),  # copy of C: also near-dup of B
        ],
    )
    write_dups(tmp_path, [("C", "B", "phash", 4.0)])
    return tmp_path


HAND = [
    ("a.tar::m1.jpg", "accepted", None, "A", None, None, 10, 10),
    ("a.tar::m2", "rejected", "tar_link", None, None, None, 0, 0),
    ("b.parquet::0", "accepted", None, "B", None, None, 20, 20),
    ("b.parquet::1", "duplicate", "phash", "C", "B", 4.0, 30, 30),
    ("d/w.png", "duplicate", "phash", "C", "B", 4.0, 30, 30),
    ("d/y.png", "rejected", "corrupt", "X", None, None, 0, 0),
    ("d/z.png", "duplicate", "exact", "A", "A", 0.0, 10, 10),
]


def part_file(run: Path, index: int) -> Path:
    return rundir.ledger_path(run) / lg.part_name(index)


def test_ledger_rows_hand_computed_in_parts(run):
    t = lg.write_ledger(run)
    assert t.schema == lg.LEDGER_SCHEMA
    assert [tuple(r.values()) for r in t.to_pylist()] == HAND
    assert t.equals(lg.build_ledger(run))  # the single-process reference
    # one part per ingest partition, each its own inputs sorted by source; the marker names them
    for index, sources in ((0, ["d/w.png", "d/y.png", "d/z.png"]), (1, [r[0] for r in HAND[:4]])):
        assert pq.read_table(part_file(run, index))["source"].to_pylist() == sources
    marker = lg.read_marker(run)
    assert marker["rows"] == 7 and sorted(marker["parts"]) == [lg.part_name(0), lg.part_name(1)]
    assert not (rundir.ledger_path(run) / lg.WORK).exists()


def random_run(root: Path, seed: int, parts: int = 5, per_part: int = 40) -> Path:
    """Partitions with exact copies inside and across partitions, rejections, near-duplicate
    groups, decontaminated uids and a shard manifest."""
    rng = random.Random(seed)
    uids = [f"{rng.getrandbits(64):016x}" for _ in range(60)]
    sources = rng.sample(range(10_000), parts * per_part)
    for p in range(parts):
        rows = []
        for s in sources[p * per_part : (p + 1) * per_part]:
            if rng.random() < 0.15:
                rows.append((f"s{s:05d}", "rejected", rng.choice(["corrupt", "too_small"]), None, 0, 0))
            else:
                rows.append((f"s{s:05d}", "accepted", None, rng.choice(uids), 8, 8))
        write_part(root, p, rows)
    used = sorted(_accepted(root))
    rep = used[0]  # the near-duplicates' representative: a kept uid
    near = rng.sample(used[1:], 12)
    write_dups(root, [(u, rep, "phash", 2.0) for u in near])
    (root / "decontam").mkdir()
    dec = [u for u in used[1:] if u not in near][:3]
    pq.write_table(
        pa.table({"uid": dec, "eval_set": ["ev"] * 3, "matched_eval_uid": ["e1"] * 3, "similarity": [0.9] * 3}),
        root / "decontam" / "decontaminated.parquet",
    )
    (root / "shards").mkdir()
    kept = sorted(set(used) - set(near) - set(dec))
    pq.write_table(pa.table({"uid": kept[::2]}), root / "shards" / "manifest.parquet")
    return root


def _accepted(root: Path) -> set[str]:
    rows = [r for p in (root / "ingest").glob("part-*.parquet") for r in pq.read_table(p).to_pylist()]
    return {r["uid"] for r in rows if r["status"] == "accepted"}


@pytest.mark.parametrize("range_rows", [1_000_000, 7])
def test_partitioned_ledger_equals_the_single_table(tmp_path, range_rows):
    run = random_run(tmp_path, seed=range_rows)
    want = lg.build_ledger(run)
    statuses = set(want["status"].to_pylist())
    assert statuses == {"rejected", "duplicate", "decontaminated", "sharded", "unselected"}
    assert "exact" in want["reason"].to_pylist()
    lg.write_parts(run, range_rows=range_rows)  # 7 rows per range: about 25 uid ranges
    assert lg.read_ledger(run).equals(want)
    # duplicates point across uid ranges; sub_run: no shard tars here to check against the manifest
    assert lg.verify_run(run, sub_run=True, range_rows=range_rows).ok


def test_verify_passes_and_counts(run):
    lg.write_ledger(run)
    rep = lg.verify_run(run, range_rows=2)
    assert rep.ok, rep.problems
    assert rep.inputs == 7
    assert rep.by_status == {"accepted": 2, "duplicate": 3, "rejected": 2}
    assert rep.by_reason == {"duplicate:exact": 1, "duplicate:phash": 2, "rejected:corrupt": 1, "rejected:tar_link": 1}
    assert "OK" in lg.format_report(rep)


def tamper(run: Path, index: int, fn) -> lg.VerifyReport:
    """Rewrite ledger part `index` through `fn(rows) -> rows`, then verify."""
    path = part_file(run, index)
    rows = fn(pq.read_table(path).to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=lg.LEDGER_SCHEMA), path)
    return lg.verify_run(run, range_rows=2)


def test_verify_catches_dropped_row(run):
    lg.write_ledger(run)
    rep = tamper(run, 1, lambda t: t[1:])
    assert not rep.ok and any("missing" in p and "a.tar::m1.jpg" in p for p in rep.problems), rep.problems
    assert any("size differs" in p and lg.part_name(1) in p for p in rep.problems)
    assert "6 ledger rows" in " ".join(rep.problems)


def test_verify_catches_double_count(run):
    lg.write_ledger(run)
    rep = tamper(run, 0, lambda t: t + [t[0]])
    assert any("counted more than once" in p and "d/w.png" in p for p in rep.problems), rep.problems


def test_verify_catches_a_kept_uid_in_two_parts(run):
    lg.write_ledger(run)

    def keep_the_copy(t):  # d/z.png is the later copy of A, kept in part 1
        t[2].update(status="accepted", reason=None, duplicate_of=None, distance=None)
        return t

    rep = tamper(run, 0, keep_the_copy)
    assert any("accepted more than once" in p and "A" in p for p in rep.problems), rep.problems


def test_verify_catches_dangling_duplicate(run):
    lg.write_ledger(run)

    def point_at_rejected(t):
        t[2]["duplicate_of"] = "X"
        return t

    rep = tamper(run, 0, point_at_rejected)
    assert any("d/z.png" in p and "accepted uid" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize(
    ("row", "change", "want"),
    [
        (1, {"status": "accepted", "reason": None}, "rejection disagrees"),  # d/y.png was corrupt
        (1, {"status": "kept"}, "unknown status"),
        (0, {"status": "accepted", "reason": None, "duplicate_of": None}, "near-duplicate"),  # d/w.png ~ B
    ],
)
def test_verify_catches_a_wrong_status(run, row, change, want):
    lg.write_ledger(run)

    def wrong(t):
        t[row].update(change)
        return t

    rep = tamper(run, 0, wrong)
    assert any(want in p and t in p for p in rep.problems for t in ("d/y.png", "kept", "d/w.png")), rep.problems
    assert "BROKEN" in lg.format_report(rep)


def test_a_ledger_without_its_done_marker_is_not_read(run):
    lg.write_ledger(run)
    (rundir.ledger_path(run) / lg.DONE).unlink()  # a writer killed before its last step
    with pytest.raises(FileNotFoundError, match="no complete ledger"):
        lg.read_ledger(run)
    rep = lg.verify_run(run)
    assert not rep.ok and "no complete ledger" in rep.problems[0]
    part_file(run, 0).unlink()
    lg.write_parts(run)  # written again: complete
    assert lg.verify_run(run).ok


def test_a_writer_that_fails_midway_leaves_no_complete_ledger(run):
    lg.write_ledger(run)
    (run / "dedup" / "duplicates.parquet").write_bytes(b"not parquet")  # round 3 cannot join it
    with pytest.raises(Exception, match="(?i)parquet"):
        lg.write_parts(run)
    assert not lg.has_ledger(run)  # the earlier ledger's marker went first: no mix of old and new parts
    with pytest.raises(FileNotFoundError, match="no complete ledger"):
        lg.read_ledger(run)


def test_a_missing_part_is_reported(run):
    lg.write_ledger(run)
    part_file(run, 1).unlink()
    rep = lg.verify_run(run)
    assert any("cannot be read" in p and lg.part_name(1) in p for p in rep.problems), rep.problems


def test_old_single_file_ledger_is_read_and_verified(run):
    want = lg.build_ledger(run)
    pq.write_table(want, lg.legacy_ledger(run))  # a run folder from before the partitioned ledger
    assert lg.read_ledger(run).equals(want) and lg.verify_run(run).ok
    rows = want.to_pylist()
    pq.write_table(pa.Table.from_pylist(rows[1:], schema=lg.LEDGER_SCHEMA), lg.legacy_ledger(run))
    assert any("missing" in p and "a.tar::m1.jpg" in p for p in lg.verify_run(run).problems)
    lg.write_parts(run)  # a new ledger replaces the old file
    assert not lg.legacy_ledger(run).exists() and lg.read_ledger(run).equals(want)


def test_verify_reports_missing_ledger(tmp_path):
    rep = lg.verify_run(tmp_path)
    assert not rep.ok and "cannot read run" in rep.problems[0]
