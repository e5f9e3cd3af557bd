"""Ingest throughput against a plain Pillow + imagehash loop, in one process.

Builds a few hundred ~384 px JPEG photos (random crops of the scikit-image / scikit-learn
photos), then times, on the same files:
  (1) baseline: single-process loop of Pillow full decode to RGB + imagehash.phash;
  (2) `ingest_partition` in this process (validation, EXIF, sha256, pHash, dHash, pHash-256);
  (3) Ray with `--cpus` CPUs mapping `ingest_partition` over partitions (`ray.remote`
      directly; `ray.init` start-up and the cold-worker first pass reported separately).
The three are timed in interleaved rounds, so load from other processes on a shared machine
hits all of them; best and median are printed, with ratios against (1), then the cProfile
entries that dominate (2).

    .venv/bin/python benchmarks/ingest.py [--n 400] [--side 384] [--cpus 2]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import imagehash
from PIL import Image

from lvd.curation.ingest import IngestConfig, ingest_partition
from lvd.curation.sources import plan_partitions
from lvd.curation.testdata import write_photo_jpegs


def baseline(paths: list[Path]) -> None:
    for path in paths:
        img = Image.open(path).convert("RGB")  # full decode
        imagehash.phash(img)


def single_process(partitions, cfg: IngestConfig) -> int:
    return sum(ingest_partition(p, cfg).records.num_rows for p in partitions)


def ray_pass(remote, partitions, cfg: IngestConfig) -> None:
    import ray

    outs = ray.get([remote.remote(p, cfg) for p in partitions])
    assert sum(o.records.num_rows for o in outs) == sum(len(p.items) for p in partitions)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def profile(partitions, cfg: IngestConfig, top: int) -> str:
    prof = cProfile.Profile()
    prof.runcall(single_process, partitions, cfg)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="number of photos to build")
    ap.add_argument("--side", type=int, default=384, help="photo side in pixels")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs given to ray.init")
    ap.add_argument("--per-partition", type=int, default=25, help="files per partition")
    ap.add_argument("--top", type=int, default=18, help="cProfile rows to print")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--draft-side", type=int, default=IngestConfig().draft_side, help="IngestConfig.draft_side")
    args = ap.parse_args()
    cfg = IngestConfig(draft_side=args.draft_side)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_photo_jpegs(tmp, args.n, side=args.side)
        paths = [Path(tmp) / n for n in names]
        partitions = plan_partitions([tmp], files_per_partition=args.per_partition)
        print(
            f"draft_side={cfg.draft_side}: {len(paths)} JPEGs of {args.side}px, {len(partitions)} partitions, os.cpu_count()={os.cpu_count()}"
        )
        baseline(paths[:20]), single_process(partitions[:1], cfg)  # warm the page cache and imports
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t0
        remote = ray.remote(num_cpus=1, max_retries=0)(ingest_partition)
        t_cold = timed(ray_pass, remote, partitions, cfg)  # workers import lvd/PIL/imagehash here
        times: dict[str, list[float]] = {"base": [], "single": [], "ray": []}
        cpu: dict[str, list[float]] = {"base": [], "single": []}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits all three
            for key, fn, fargs in (("base", baseline, (paths,)), ("single", single_process, (partitions, cfg))):
                c0 = time.process_time()
                times[key].append(timed(fn, *fargs))
                cpu[key].append(time.process_time() - c0)
            times["ray"].append(timed(ray_pass, remote, partitions, cfg))
        ray.shutdown()
        n, best = len(paths), {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"best / median of {args.repeat} interleaved runs; ratios vs (1) best-to-best (median-to-median)")
        for key, label in (("base", "(1) baseline Pillow decode + phash loop"),
                           ("single", "(2) ingest_partition, one process"),
                           ("ray", f"(3) Ray, {args.cpus} CPUs, warm workers")):  # fmt: skip
            print(f"{label:42s}: {n / best[key]:7.1f} / {n / med[key]:7.1f} img/s  "
                  f"{best['base'] / best[key]:.2f}x ({med['base'] / med[key]:.2f}x)")  # fmt: skip
        cpu_ms = {k: 1000 * min(v) / n for k, v in cpu.items()}
        print(
            f"    CPU time per image (immune to other processes' load): baseline {cpu_ms['base']:.2f} ms, "
            f"ingest {cpu_ms['single']:.2f} ms, {cpu_ms['base'] / cpu_ms['single']:.2f}x"
        )
        print(
            f"    ray.init(num_cpus={args.cpus}) start-up: {startup:.2f} s; first (cold-worker) pass "
            f"{n / t_cold:.1f} img/s, {best['base'] / t_cold:.2f}x; neither counted above"
        )
        print("\ncProfile of (2), by own time:")
        print(profile(partitions, cfg, args.top))


if __name__ == "__main__":
    main()
