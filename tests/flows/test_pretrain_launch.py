"""launch_with_relaunches against real `lvd pretrain` child processes that fail early (no
ranks are started, so each attempt costs one Python start): the give-up message after the
allowed relaunches, and no relaunch for a failure that would repeat."""

from __future__ import annotations

import sys

import pytest

from lvd.flows.pretrain_launch import LaunchFailed, RanksCommand, launch_with_relaunches


def _spec(tmp_path, **kw) -> RanksCommand:
    kw.setdefault("shards", (str(tmp_path),))
    kw.setdefault("recipe", "tiny")
    kw.setdefault("nproc_per_node", 2)
    return RanksCommand(out=tmp_path / "run", **kw)


def test_command_line_has_only_the_given_flags(tmp_path):
    spec = _spec(tmp_path, max_steps=5, deterministic=True)
    assert spec.command(resume=True) == [
        sys.executable, "-m", "lvd.flows.cli", "pretrain", "--shards", str(tmp_path),
        "--recipe", "tiny", "--out", str(tmp_path / "run"), "--num-workers", "0", "--seed", "0",
        "--nproc-per-node", "2", "--max-steps", "5", "--deterministic", "--resume"]
    assert "--resume" not in spec.command(resume=False)
    with pytest.raises(ValueError, match="2 or more ranks"):
        _spec(tmp_path, nproc_per_node=1)


def test_gives_up_after_the_allowed_relaunches_naming_the_logs(tmp_path):
    # an unknown recipe fails in the launcher process itself, every time (after the shard
    # paths are found: the CLI checks those first)
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    spec = _spec(tmp_path, recipe="no-such-recipe")
    relaunched: list[tuple[int, int]] = []
    with pytest.raises(LaunchFailed) as err:
        launch_with_relaunches(spec, resume=False, max_relaunches=1, on_poll=lambda: None,
                               before_relaunch=lambda a, c: relaunched.append((a, c)))
    message = str(err.value)
    logs = [spec.out / "launch-1.log", spec.out / "launch-2.log"]
    assert relaunched == [(1, 1)]
    assert "failed after 1 relaunch(es) (last exit code 1)" in message
    assert f"logs: {logs[0]}, {logs[1]}" in message
    assert "unknown recipe 'no-such-recipe'" in message  # the tail of the last log
    assert logs[0].read_text().splitlines()[0].endswith("--nproc-per-node 2")
    assert logs[1].read_text().splitlines()[0].endswith("--resume")  # relaunches resume
    assert not (spec.out / "launch-3.log").exists()


def test_a_failure_that_would_repeat_is_not_relaunched(tmp_path):
    spec = _spec(tmp_path, shards=(str(tmp_path / "no-shards-here"),))
    relaunched: list[tuple[int, int]] = []
    with pytest.raises(LaunchFailed) as err:
        launch_with_relaunches(spec, resume=False, max_relaunches=2, on_poll=lambda: None,
                               before_relaunch=lambda a, c: relaunched.append((a, c)))
    assert relaunched == []
    message = str(err.value)
    assert "stopped with missing shards" in message and "not relaunched" in message
    assert str(tmp_path / "no-shards-here") in message
    assert not (spec.out / "launch-2.log").exists()
