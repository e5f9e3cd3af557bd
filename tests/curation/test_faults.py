"""Faults: a SIGKILLed flow, a dead Ray worker process, a removed Ray node.

Each leaves a complete run whose ledger equals an uninterrupted run's. Everything is real:
the CLI in a subprocess killed with SIGKILL, a worker that `os._exit`s, and a
`ray.cluster_utils.Cluster` node removed mid-stage (in a subprocess, since the session's
Ray is already initialised in this process).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _node_removal import run_with_node_removal
from plain_curate import curate_without_prefect
from ray import cloudpickle

from lvd.curation import ledger, runner, testdata
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.stages import ingest_dedup as stages

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ICFG, DCFG = IngestConfig(), DedupConfig()


@pytest.fixture(scope="module")
def small_dump(tmp_path_factory) -> Path:
    """~40 inputs: photos, exact copies, broken files."""
    root = tmp_path_factory.mktemp("small-dump")
    names = testdata.write_photo_jpegs(root / "photos", 16, side=160)
    for name in names[:6]:
        shutil.copyfile(root / "photos" / name, root / "photos" / f"copy_{name}")
    testdata.write_bad_inputs(root / "bad")
    return root


@pytest.fixture(scope="module")
def big_dump(tmp_path_factory) -> Path:
    """1,200 files (24 distinct photos, many byte copies) so ingest takes a few seconds."""
    root = tmp_path_factory.mktemp("big-dump")
    names = testdata.write_photo_jpegs(root / "src", 24, side=320)
    (root / "dump").mkdir()
    for k in range(1200):
        shutil.copyfile(root / "src" / names[k % 24], root / "dump" / f"{k:05d}.jpg")
    testdata.write_bad_inputs(root / "dump" / "bad")
    return root / "dump"


def reference_ledger(dump: Path, out: Path, partition_size: int, shard: bool = False):
    return curate_without_prefect(
        [str(dump)], out, partition_size=partition_size, ingest_cfg=ICFG, dedup_cfg=DCFG, shard=shard
    )


def markers(stage_dir: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in stage_dir.glob(f"part-*{runner.MARKER_SUFFIX}")}


def test_sigkill_mid_ingest_then_rerun_resumes(ray_local, prefect_harness, big_dump, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from lvd.cli import main as cli

    want = reference_ledger(
        big_dump, tmp_path / "reference", 40, shard=True
    )  # as `lvd curate --no-copy-detection` without embedder
    total = len(stages.plan([str(big_dump)], 40))
    out = tmp_path / "run"
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    address = ray_local.get_runtime_context().gcs_address
    # kill/resume of ingest, not copy detection: the reference (ingest, dedup, shard) runs no copy detection
    argv = ["curate", "--input", str(big_dump), "--out", str(out), "--partition-size", "40", "--no-copy-detection"]
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lvd.cli", *argv, "--ray-address", address],
            env=env,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and not markers(out / "ingest") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]
    time.sleep(2.0)  # let Ray reap the dead driver's tasks before taking the snapshot
    before = markers(out / "ingest")
    assert 0 < len(before) < total, f"kill landed outside ingest: {len(before)}/{total} done"
    assert not ledger.has_ledger(out)

    assert cli.main(argv) == 0  # started again, in this process
    after = markers(out / "ingest")
    assert len(after) == total
    assert {k: after[k] for k in before} == before  # done partitions were not redone
    assert ledger.read_ledger(out).equals(want)


@dataclass(frozen=True)
class DieOnce:
    """Ingest, except the worker process dies on partition `index` while `flag` exists."""

    inner: stages.IngestFn
    flag: str
    index: int

    def __call__(self, partition):
        if partition.index == self.index and os.path.exists(self.flag):
            os.unlink(self.flag)
            os._exit(1)
        return self.inner(partition)


def test_worker_process_death_is_retried(ray_local, small_dump, tmp_path):
    want = reference_ledger(small_dump, tmp_path / "reference", 8)
    out, flag = tmp_path / "run", tmp_path / "die"
    flag.touch()
    parts = stages.plan([str(small_dump)], 8)
    assert len(parts) >= 3
    rep = runner.map_partitions(
        DieOnce(stages.IngestFn(ICFG), str(flag), 1),
        parts,
        out / "ingest",
        cfg_hash=runner.config_hash(ICFG),
        runner=runner.RunnerConfig(max_retries=2),
    )
    assert not flag.exists()  # the worker really died once
    assert rep.ran == [p.index for p in parts]
    stages.run_dedup(out, DCFG)
    assert ledger.write_ledger(out).equals(want)
    assert ledger.verify_run(out).ok


NODE_REMOVAL_WORK = """
import sys
from pathlib import Path
from lvd.curation import ledger, runner
from lvd.curation.stages import ingest_dedup as stages
from lvd.curation.dedup import DedupConfig
from lvd.curation.ingest import IngestConfig

def work(progress):
    dump, out = sys.argv[1], Path(sys.argv[2])
    parts = stages.plan([dump], 8)
    rep = stages.run_ingest(parts, out, IngestConfig(), runner.RunnerConfig(max_retries=3),
                            progress=progress)
    stages.run_dedup(out, DedupConfig())
    ledger.write_ledger(out)
    return {"ran": len(rep.ran)}
"""


def test_node_removed_mid_stage(ray_local, small_dump, tmp_path):
    want = reference_ledger(small_dump, tmp_path / "reference", 8)
    total = len(stages.plan([str(small_dump)], 8))
    out = tmp_path / "run"
    result = run_with_node_removal(NODE_REMOVAL_WORK, str(small_dump), str(out), timeout=300)
    done_at_removal, seen_total = result["removed_at"]
    assert seen_total == total and done_at_removal < total  # removed mid-stage
    assert result["ran"] == total
    assert ledger.read_ledger(out).equals(want)
    assert ledger.verify_run(out).ok
