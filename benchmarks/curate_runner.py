"""Runner throughput: ingest through Ray tasks vs the same work serially in this process.

Both paths call `runner.run_one` (stage function + outputs + done-marker) on the same
partitions; the baseline loops in the driver, the runner fans out Ray tasks. Printed: the
speed-up ratio (serial time / Ray time) and Ray's per-partition overhead on tiny partitions.

Run: .venv/bin/python benchmarks/curate_runner.py [--files 1200] [--cpus 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import ray

from lvd.curation import runner, testdata
from lvd.curation.ingest import IngestConfig
from lvd.curation.stages import ingest_dedup as stages


def make_dump(root: Path, n_files: int) -> Path:
    names = testdata.write_photo_jpegs(root / "src", 32, side=384)
    dump = root / "dump"
    dump.mkdir()
    for k in range(n_files):
        shutil.copyfile(root / "src" / names[k % len(names)], dump / f"{k:06d}.jpg")
    return dump


def serial(fn, parts, out: Path, cfg_hash: str) -> float:
    out.mkdir(parents=True)
    t = time.perf_counter()
    for p in parts:
        runner.run_one(fn, p, str(out), cfg_hash)
    return time.perf_counter() - t


def with_ray(fn, parts, out: Path, cfg_hash: str) -> float:
    t = time.perf_counter()
    runner.map_partitions(fn, parts, out, cfg_hash=cfg_hash)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=1200)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = IngestConfig()
    fn, cfg_hash = stages.IngestFn(cfg), runner.config_hash(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dump = make_dump(tmp, args.files)
        with_ray(fn, stages.plan([str(dump)], 64), tmp / "warmup", cfg_hash)  # start workers
        for size in (100, 1):
            parts = stages.plan([str(dump)], size)
            t_serial = serial(fn, parts, tmp / f"serial-{size}", cfg_hash)
            t_ray = with_ray(fn, parts, tmp / f"ray-{size}", cfg_hash)
            print(
                f"partition size {size:>3} ({len(parts)} partitions, {args.files} files, {args.cpus} CPUs): "
                f"serial {t_serial:.2f}s, ray {t_ray:.2f}s, speed-up x{t_serial / t_ray:.2f}, "
                f"ray per partition {1000 * t_ray / len(parts):.1f} ms"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
