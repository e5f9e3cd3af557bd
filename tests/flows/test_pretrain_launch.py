"""launch_with_relaunches against real child processes that fail early (no ranks are started,
so each attempt costs one Python start): the give-up message after the allowed relaunches of
a launch that crashes, and no relaunch when `lvd pretrain` exits with EXIT_REPEATS (bad
inputs or settings). A real killed rank and its relaunch: tests/flows/test_pretrain_relaunch.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from lvd.flows.pretrain_launch import LaunchFailed, RanksCommand, launch_with_relaunches
from lvd.pretrain.failures import EXIT_REPEATS


def _spec(tmp_path, **kw) -> RanksCommand:
    kw.setdefault("shards", (str(tmp_path),))
    kw.setdefault("recipe", "tiny")
    kw.setdefault("nproc_per_node", 2)
    return RanksCommand(out=tmp_path / "run", **kw)


def test_command_line_has_only_the_given_flags(tmp_path):
    spec = _spec(tmp_path, max_steps=5, deterministic=True)
    assert spec.command(resume=True) == [
        sys.executable,
        "-m",
        "lvd.cli",
        "pretrain",
        "--shards",
        str(tmp_path),
        "--recipe",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        "--num-workers",
        "0",
        "--seed",
        "0",
        "--nproc-per-node",
        "2",
        "--max-steps",
        "5",
        "--deterministic",
        "--resume",
    ]
    assert "--resume" not in spec.command(resume=False)
    with pytest.raises(ValueError, match="2 or more ranks"):
        _spec(tmp_path, nproc_per_node=1)


@dataclass(frozen=True, kw_only=True)
class CrashingRanks(RanksCommand):
    """A launch that dies with exit code 1 (what a killed rank makes of the launcher), each time."""

    def command(self, *, resume: bool) -> list[str]:
        code = "import sys; print('rank 1 lost its node', file=sys.stderr); sys.exit(1)"
        return [sys.executable, "-c", code, *(["--resume"] if resume else [])]


def test_gives_up_after_the_allowed_relaunches_naming_the_logs(tmp_path):
    spec = CrashingRanks(shards=(str(tmp_path),), recipe="tiny", nproc_per_node=2, out=tmp_path / "run")
    relaunched: list[tuple[int, int]] = []
    with pytest.raises(LaunchFailed) as err:
        launch_with_relaunches(
            spec,
            resume=False,
            max_relaunches=1,
            on_poll=lambda: None,
            before_relaunch=lambda a, c: relaunched.append((a, c)),
        )
    message = str(err.value)
    logs = [spec.out / "launch-1.log", spec.out / "launch-2.log"]
    assert relaunched == [(1, 1)]
    assert "failed after 1 relaunch(es) (last exit code 1)" in message
    assert f"logs: {logs[0]}, {logs[1]}" in message
    assert "rank 1 lost its node" in message  # the tail of the last log
    assert not logs[0].read_text().splitlines()[0].endswith("--resume")
    assert logs[1].read_text().splitlines()[0].endswith("--resume")  # relaunches resume
    assert not (spec.out / "launch-3.log").exists()


@pytest.mark.parametrize("bad", ["shards", "recipe", "setting"])
def test_a_failure_that_would_repeat_is_not_relaunched(bad, tmp_path):
    """Bad inputs and settings: `lvd pretrain` exits with EXIT_REPEATS and the flow stops there."""
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    spec = _spec(
        tmp_path,
        **{
            "shards": {"shards": (str(tmp_path / "no-shards-here"),)},
            "recipe": {"recipe": "no-such-recipe"},
            "setting": {"sets": ("optim.no_such_field=1",)},
        }[bad],
    )
    relaunched: list[tuple[int, int]] = []
    with pytest.raises(LaunchFailed) as err:
        launch_with_relaunches(
            spec,
            resume=False,
            max_relaunches=2,
            on_poll=lambda: None,
            before_relaunch=lambda a, c: relaunched.append((a, c)),
        )
    assert relaunched == []
    message = str(err.value)
    assert f"a relaunch would repeat (exit code {EXIT_REPEATS})" in message and "not relaunched" in message
    assert {"shards": str(tmp_path / "no-shards-here"), "recipe": "no-such-recipe", "setting": "optim.no_such_field"}[
        bad
    ] in message  # the tail of the log: the CLI's error line
    assert not (spec.out / "launch-2.log").exists()
