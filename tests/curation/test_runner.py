"""Runner: outputs + done-markers, skip on rerun, rerun on changes, bounded in-flight, retries.

Stage functions here are small real functions run by the session's real local Ray.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from lvd.curation import runner as rn

# Ray workers cannot import this test module, so ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Part:
    index: int
    fingerprint: str
    n: int = 3


def squares(p: Part) -> dict[str, pa.Table]:
    x = list(range(p.index * 10, p.index * 10 + p.n))
    return {"": pa.table({"x": x}), "sq": pa.table({"x2": [v * v for v in x]})}


def parts(k: int = 4) -> list[Part]:
    return [Part(i, f"fp{i}") for i in range(k)]


def test_outputs_and_markers_written(ray_local, tmp_path):
    rep = rn.map_partitions(squares, parts(), tmp_path, cfg_hash="c1")
    assert rep.ran == [0, 1, 2, 3] and rep.skipped == []
    assert pq.read_table(tmp_path / "part-000002.parquet")["x"].to_pylist() == [20, 21, 22]
    assert pq.read_table(tmp_path / "part-000002.sq.parquet")["x2"].to_pylist() == [400, 441, 484]
    marker = json.loads((tmp_path / "part-000002.done.json").read_text())
    files = marker.pop("files")
    assert marker == {
        "index": 2,
        "fingerprint": "fp2",
        "config_hash": "c1",
        "outputs": {"main": "part-000002.parquet", "sq": "part-000002.sq.parquet"},
        "rows": {"main": 3, "sq": 3},
    }
    for name in marker["outputs"].values():  # what is_done checks the outputs against
        data = (tmp_path / name).read_bytes()
        assert files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [p for p in tmp_path.iterdir() if rn.TMP_TAG in p.name]


def test_rerun_skips_done_partitions(ray_local, tmp_path):
    rn.map_partitions(squares, parts(), tmp_path, cfg_hash="c1")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    seen = []
    rep = rn.map_partitions(squares, parts(), tmp_path, cfg_hash="c1", progress=lambda d, t: seen.append((d, t)))
    assert rep.ran == [] and rep.skipped == [0, 1, 2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert seen == [(4, 4)]


def test_changes_rerun_only_affected_partitions(ray_local, tmp_path):
    rn.map_partitions(squares, parts(), tmp_path, cfg_hash="c1")
    changed = parts()
    changed[1] = Part(1, "fp1-new")  # input changed
    (tmp_path / "part-000002.sq.parquet").unlink()  # an output lost
    (tmp_path / "part-000003.done.json").unlink()  # killed before its marker
    (tmp_path / "part-000000.parquet.tmp-dead").write_bytes(b"half")  # killed mid-write
    seen = []
    rep = rn.map_partitions(squares, changed, tmp_path, cfg_hash="c1", progress=lambda d, t: seen.append(d))
    assert rep.ran == [1, 2, 3] and rep.skipped == [0]
    assert seen == [1, 2, 3, 4]
    rn.map_partitions(squares, changed[:3], tmp_path, cfg_hash="c1")  # input set shrank
    assert not (tmp_path / "part-000003.done.json").exists()
    assert json.loads((tmp_path / "part-000001.done.json").read_text())["fingerprint"] == "fp1-new"
    assert not (tmp_path / "part-000000.parquet.tmp-dead").exists()
    rep = rn.map_partitions(squares, changed, tmp_path, cfg_hash="c2")  # config changed
    assert rep.ran == [0, 1, 2, 3]


def sleepy(p: Part) -> dict[str, pa.Table]:
    start = time.monotonic()
    time.sleep(0.2)
    return {"": pa.table({"start": [start], "end": [time.monotonic()]})}


def test_max_in_flight_bounds_concurrency(ray_local, tmp_path):
    cfg = rn.RunnerConfig(max_in_flight=1)
    rn.map_partitions(sleepy, parts(4), tmp_path, cfg_hash="c", runner=cfg)
    spans = sorted(tuple(pq.read_table(tmp_path / f"part-{i:06d}.parquet").to_pylist()[0].values()) for i in range(4))
    # One task at a time: each starts after the previous ended.
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))


@dataclass(frozen=True)
class FlagPart:
    index: int
    fingerprint: str
    flag: str
    attempts: str


def crash_once(p: FlagPart) -> dict[str, pa.Table]:
    with open(p.attempts, "a") as f:
        f.write("x")
    if os.path.exists(p.flag):
        os.unlink(p.flag)
        os._exit(1)  # a real worker death, not an exception
    return {"": pa.table({"i": [p.index]})}


def test_worker_death_is_retried(ray_local, tmp_path):
    flag, attempts = tmp_path / "flag", tmp_path / "attempts"
    flag.touch()
    out = tmp_path / "out"
    ps = [FlagPart(i, "f", str(flag) if i == 1 else "", str(attempts)) for i in range(3)]
    rep = rn.map_partitions(crash_once, ps, out, cfg_hash="c", runner=rn.RunnerConfig(max_retries=2))
    assert rep.ran == [0, 1, 2]
    assert len(attempts.read_text()) == 4  # partition 1 ran twice
    assert pq.read_table(out / "part-000001.parquet")["i"].to_pylist() == [1]


def raises(p: FlagPart) -> dict[str, pa.Table]:
    with open(p.attempts, "a") as f:
        f.write("x")
    raise ValueError("bad config")


def test_exceptions_are_not_retried_and_leave_no_marker(ray_local, tmp_path):
    attempts = tmp_path / "attempts"
    out = tmp_path / "out"
    with pytest.raises(Exception, match="bad config"):
        rn.map_partitions(raises, [FlagPart(0, "f", "", str(attempts))], out, cfg_hash="c")
    assert attempts.read_text() == "x"
    assert not (out / "part-000000.done.json").exists()


def test_whole_stage_uses_its_stem(ray_local, tmp_path):
    unit = rn.WholeStage(fingerprint="abc", stem="duplicates")
    rep = rn.map_partitions(lambda u: {"": pa.table({"a": [1]})}, [unit], tmp_path, cfg_hash="c")
    assert rep.ran == [0]
    assert (tmp_path / "duplicates.parquet").exists() and (tmp_path / "duplicates.done.json").exists()


def test_config_validation_and_hash():
    with pytest.raises(ValueError, match="max_in_flight"):
        rn.RunnerConfig(max_in_flight=0)
    with pytest.raises(ValueError, match="max_retries"):
        rn.RunnerConfig(max_retries=-1)
    assert rn.config_hash(rn.RunnerConfig()) == rn.config_hash(rn.RunnerConfig())
    assert rn.config_hash(rn.RunnerConfig()) != rn.config_hash(rn.RunnerConfig(num_cpus=2))


def _fails_on_unit_one(state, unit):
    if unit.index == 1:
        raise ValueError("unit 1 is bad")
    return {"": pa.table({"x": [unit.index]})}


def _record_pid(folder: str) -> dict:
    """An actor's state: its process id, left in `folder` so the test can watch it."""
    Path(folder, str(os.getpid())).touch()
    return {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_actor_pool_kills_its_actors_when_the_stage_fails(ray_local, tmp_path):
    """A stage that raises still takes its actors down (they hold a model's memory each)."""
    from lvd.curation import actor_runner

    units = [rn.WholeStage(fingerprint=str(i), stem=f"part-{i:06d}", index=i) for i in range(3)]
    acfg = actor_runner.ActorConfig(n_actors=2, max_restarts=0, max_task_retries=0)
    pids = tmp_path / "pids"
    pids.mkdir()
    # the error is kept, as a flow that reports it does: its traceback holds the stage's frames
    with pytest.raises(Exception, match="unit 1 is bad") as error:
        actor_runner.map_with_actors(
            functools.partial(_record_pid, str(pids)),
            _fails_on_unit_one,
            units,
            tmp_path / "stage",
            cfg_hash="h",
            acfg=acfg,
        )
    actors = [int(p.name) for p in pids.iterdir()]
    assert actors  # the actors did start
    deadline = time.monotonic() + 30
    while any(map(_alive, actors)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(map(_alive, actors)), "actors outlived a failed stage"
    assert error.traceback
