"""Durability: what a done-marker proves, concurrent writers, and inputs that kill their worker.

Everything runs for real: the session's local Ray, a Ray worker that `os._exit`s on one input
(a decoder crash or an out-of-memory kill looks the same to Ray), real files truncated on disk.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from plain_curate import curate_without_prefect
from ray import cloudpickle

from lvd import durable
from lvd.curation import ingest, isolate, ledger, runner, testdata
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.stages import ingest_dedup as stages

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Part:
    index: int
    fingerprint: str


def numbers(p: Part) -> dict[str, pa.Table]:
    return {"": pa.table({"x": list(range(p.index * 1000, p.index * 1000 + 1000))})}


def test_truncated_output_reruns_its_partition(ray_local, tmp_path):
    parts = [Part(i, f"fp{i}") for i in range(3)]
    runner.map_partitions(numbers, parts, tmp_path, cfg_hash="c")
    out = tmp_path / "part-000001.parquet"
    good = out.read_bytes()
    with open(out, "r+b") as f:  # a torn write / full disk after the marker was written
        f.truncate(len(good) // 2)
    rep = runner.map_partitions(numbers, parts, tmp_path, cfg_hash="c")
    assert rep.ran == [1] and rep.skipped == [0, 2]
    assert out.read_bytes() == good


def test_same_size_corruption_needs_the_checksum_flag(ray_local, tmp_path):
    """Sizes are checked on every resume; sha256 (re-reads every output) only when asked."""
    parts = [Part(i, f"fp{i}") for i in range(2)]
    runner.map_partitions(numbers, parts, tmp_path, cfg_hash="c")
    out = tmp_path / "part-000000.parquet"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size, other bytes
    out.write_bytes(bytes(data))
    assert runner.map_partitions(numbers, parts, tmp_path, cfg_hash="c").ran == []
    rep = runner.map_partitions(
        numbers, parts, tmp_path, cfg_hash="c", runner=runner.RunnerConfig(verify_checksums=True)
    )
    assert rep.ran == [0] and rep.skipped == [1]
    assert pq.read_table(out)["x"].to_pylist()[:2] == [0, 1]


def _hammer(path: str, tag: int, rounds: int) -> None:
    for r in range(rounds):
        payload = (f"{tag}:{r}:".encode()) * 20_000  # ~200 KB: several write() calls' worth
        durable.write_bytes(path, payload)


def test_concurrent_writers_never_collide(tmp_path):
    """Four processes rewrite one file 25 times each: no error, never a torn file, no temp left."""
    path = tmp_path / "ledger.parquet"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), tag, 25)) for tag in range(4)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if path.exists():
            data = path.read_bytes()
            tag, r = data.split(b":")[:2]
            assert data == b"%s:%s:" % (tag, r) * 20_000, "a reader saw a torn file"
    for p in procs:
        p.join()
        assert p.exitcode == 0, "a writer failed (temp name collision?)"
    assert not [p.name for p in tmp_path.iterdir() if durable.is_temp(p.name)]
    assert len({durable.temp_path(path) for _ in range(1000)}) == 1000
    assert str(os.getpid()) in durable.temp_path(path).name


# ---------------------------------------------------------------- a worker killed by one input


@dataclass(frozen=True)
class DiesOnInput(stages.IngestFn):
    """Ingest, except that the worker process dies (os._exit, like a codec segfault or the
    kernel's OOM killer) whenever it reaches an input whose source ends with `killer`."""

    killer: str = "KILLER"

    def _check(self, item) -> None:
        if item.source.endswith(self.killer):
            os._exit(1)

    def __call__(self, partition):
        from lvd.curation.sources import iter_items

        for item in iter_items(partition):
            self._check(item)
        return super().__call__(partition)

    def ingest_item(self, item):
        self._check(item)
        return ingest.ingest_item(item, self.cfg)


@pytest.fixture(scope="module")
def killer_dump(tmp_path_factory) -> Path:
    """12 photos + broken files, one file that kills its worker, and a tar with one more."""
    root = tmp_path_factory.mktemp("killer-dump")
    names = testdata.write_photo_jpegs(root / "photos", 14, side=96)
    testdata.write_bad_inputs(root / "photos" / "bad")
    (root / "photos" / names[12]).rename(root / "photos" / "p-KILLER")  # a photo of its own
    (root / "photos" / names[13]).rename(root / "m-KILLER")
    with tarfile.open(root / "members.tar", "w") as tar:
        for name in [names[0], names[5]]:
            tar.add(root / "photos" / name, arcname=f"ok-{name}")
        tar.add(root / "m-KILLER", arcname="m-KILLER")
        tar.add(root / "photos" / names[8], arcname=f"zz-{names[8]}")
    return root


def test_input_that_kills_its_worker_is_rejected_not_fatal(ray_local, killer_dump, tmp_path):
    cfg = IngestConfig()
    inputs = [str(killer_dump / "photos"), str(killer_dump / "members.tar")]
    partitions = stages.plan(inputs, 5)
    rep = runner.map_partitions(
        DiesOnInput(cfg),
        partitions,
        tmp_path / "ingest",
        cfg_hash=runner.config_hash(cfg),
        runner=runner.RunnerConfig(max_retries=1),
    )
    assert sorted(rep.ran) == [p.index for p in partitions]
    stages.run_dedup(tmp_path, DedupConfig())
    table = ledger.write_ledger(tmp_path)
    report = ledger.verify_run(tmp_path)
    assert report.ok, report.problems
    rows = {s: (st, r) for s, st, r in zip(*(table[c].to_pylist() for c in ("source", "status", "reason")))}
    died = sorted(s for s, (st, r) in rows.items() if r == isolate.REASON)
    assert died == [str(killer_dump / "members.tar") + "::m-KILLER", str(killer_dump / "photos" / "p-KILLER")]
    assert all(rows[s][0] == "rejected" for s in died)
    # every other input has the record a plain ingest gives it; each input exactly once
    plain = curate_without_prefect(
        inputs, tmp_path / "plain", partition_size=5, ingest_cfg=cfg, dedup_cfg=DedupConfig()
    )
    want = dict(zip(plain["source"].to_pylist(), zip(plain["status"].to_pylist(), plain["reason"].to_pylist())))
    assert table.num_rows == len(rows) == len(want)
    assert {s: v for s, v in rows.items() if s not in died} == {s: v for s, v in want.items() if s not in died}
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "ingest").glob("*.done.json"))]
    assert sorted(s for m in markers for s in m.get("worker_died", [])) == died
    assert not [p.name for p in (tmp_path / "ingest").iterdir() if durable.is_temp(p.name)]
