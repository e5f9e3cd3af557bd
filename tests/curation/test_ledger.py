"""Ledger: exact copies by source order, near-duplicates by representative, verify catches tampering.

Manifests are written by hand here so the expected ledger can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvd.curation import ledger as lg


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


def test_ledger_rows_hand_computed(run):
    t = lg.write_ledger(run)
    assert t.schema == lg.LEDGER_SCHEMA
    assert pq.read_table(run / "ledger.parquet").equals(t)
    rows = [tuple(r.values()) for r in t.to_pylist()]
    assert rows == [
        ("a.tar::m1.jpg", "accepted", None, "A", None, None, 10, 10),
        ("a.tar::m2", "rejected", "tar_link", None, None, None, 0, 0),
        ("b.parquet::0", "accepted", None, "B", None, None, 20, 20),
        ("b.parquet::1", "duplicate", "phash", "C", "B", 4.0, 30, 30),
        ("d/w.png", "duplicate", "phash", "C", "B", 4.0, 30, 30),
        ("d/y.png", "rejected", "corrupt", "X", None, None, 0, 0),
        ("d/z.png", "duplicate", "exact", "A", "A", 0.0, 10, 10),
    ]


def test_verify_passes_and_counts(run):
    lg.write_ledger(run)
    rep = lg.verify_run(run)
    assert rep.ok, rep.problems
    assert rep.inputs == 7
    assert rep.by_status == {"accepted": 2, "duplicate": 3, "rejected": 2}
    assert rep.by_reason == {"duplicate:exact": 1, "duplicate:phash": 2, "rejected:corrupt": 1, "rejected:tar_link": 1}
    assert "OK" in lg.format_report(rep)


def tamper(run: Path, fn) -> lg.VerifyReport:
    t = pq.read_table(run / "ledger.parquet").to_pylist()
    t = fn(t)
    pq.write_table(pa.Table.from_pylist(t, schema=lg.LEDGER_SCHEMA), run / "ledger.parquet")
    return lg.verify_run(run)


def test_verify_catches_dropped_row(run):
    lg.write_ledger(run)
    rep = tamper(run, lambda t: t[1:])
    assert not rep.ok and any("missing" in p and "a.tar::m1.jpg" in p for p in rep.problems)


def test_verify_catches_double_count(run):
    lg.write_ledger(run)
    rep = tamper(run, lambda t: t + [t[0]])
    assert any("more than once" in p for p in rep.problems)


def test_verify_catches_dangling_duplicate(run):
    lg.write_ledger(run)

    def point_at_rejected(t):
        t[6]["duplicate_of"] = "X"
        return t

    rep = tamper(run, point_at_rejected)
    assert any("d/z.png" in p and "accepted uid" in p for p in rep.problems)


def test_verify_catches_unrejected_input(run):
    lg.write_ledger(run)

    def accept_corrupt(t):
        t[5].update(status="accepted", reason=None)
        return t

    rep = tamper(run, accept_corrupt)
    assert any("rejection disagrees" in p and "d/y.png" in p for p in rep.problems)
    assert "BROKEN" in lg.format_report(rep)


def test_verify_reports_missing_ledger(tmp_path):
    rep = lg.verify_run(tmp_path)
    assert not rep.ok and "cannot read run" in rep.problems[0]
