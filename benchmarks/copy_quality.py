"""Copy detection on a real-photo dump: recall per copy kind, distinct originals merged, cost.

The dump is `lvd.curation.copies.write_bench_dump` (229 distinct real originals that ship with
scikit-image / scikit-learn / Debian's Fashion-MNIST, in five look-alike groups: whole photos,
non-overlapping tiles of one photo, burst-like window pairs, white-background product shots,
aligned faces; one copy of each of 11 kinds per original; a few broken files). Nothing in it
was tuned image by image, and the copy detector's calibration makes its own copies with other
transforms and ranges (`copydetect.CALIB_KINDS`).

Rows, all from the real stages on one run folder (ingest -> dedup -> copy features -> copy
detection), in one process:
- `imagehash pHash<=8`: the baseline, plain `imagehash.phash` at Hamming distance <= 8;
- `(a) hashes`: lvd's hash dedup stage alone (pHash/dHash/pHash-256/thumbnail + equalised pHash);
- `(b) copy detector`: hashes + model-free k-NN candidates, verified by local features;
- `(c) + embedder`: the same with an embedder proposing candidates too (`--embedder SPEC`).
A copy is found when its group representative is its original's; `exact` copies share the
original's uid (the ledger merges them), so they count as found. `merged` counts distinct
originals that share a group with another original (every one is a false merge).

Cost per image on this machine: ingest, hash dedup, copy features, copy detection (with its
split into calibration, candidates, verification); the pairs verified per second; and the
ratio of curation with the copy detector to ingest + hash dedup (the baseline, same run).

`--web-size PX` re-encodes every image of the dump, originals and copies alike, upscaled so that
its longer side is PX (bicubic; same name and format, JPEG / WebP at q90; broken files as they
are): the same copies at the sizes of a web dump. Ingest's cost grows with the file (reading,
hashing the bytes, decoding), copy features decode to 256 px whatever the size, so the ratio
to the baseline depends on the images' size: report the dump's sizes with it.

Run: .venv/bin/python benchmarks/copy_quality.py [--embedder RUN] [--dump DIR] [--web-size 1024]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.compute as pc
from PIL import Image

from lvd.curation import copies, ledger, runner
from lvd.curation.copydetect import CopyDetectConfig
from lvd.curation.dedup import DedupConfig
from lvd.curation.embed import EmbedConfig
from lvd.curation.ingest import IngestConfig
from lvd.curation.localfeat import FeatureConfig
from lvd.curation.stages import copy as stages_copy
from lvd.curation.stages import embed as stages_embed
from lvd.curation.stages import ingest_dedup as stages

KINDS = tuple(k for k in copies.BENCH_KINDS)
REAL_KINDS = tuple(copies.COPY_KINDS)


def _face(f: np.ndarray) -> Image.Image:
    return Image.fromarray((f * 255).astype(np.uint8)).resize((96, 96), Image.BICUBIC).convert("RGB")


def real_dump(
    root: Path, n_products: int = 300, n_faces: int = 60, n_copied: int = 60, seed: int = 7
) -> copies.BenchTruth:
    """The untuned real check: Fashion-MNIST *train* products (the bench dump uses the test
    split) and LFW faces 100-159 (it uses the first 100), all 96 px; `n_copied` of them get one
    copy per `copies.make_copies` kind (the older generator: other ranges than the bench
    dump's); one broken file. Nothing here was looked at while tuning the detector."""
    import skimage.data

    # 30 more drawn, as in the first run of this check (they were its retrieval seeds)
    prods = copies.fashion_mnist(n_products + 30, size=96, seed=seed, split="train")[:n_products]
    faces = skimage.data.lfw_subset()[100 : 100 + n_faces]
    imgs = [(f"prod{i:03d}", "product", im) for i, im in enumerate(prods)]
    imgs += [(f"face{i:03d}", "face", _face(f)) for i, f in enumerate(faces)]
    copied = set(np.random.default_rng(seed + 4).choice(len(imgs), n_copied, replace=False).tolist())
    files: dict[str, dict] = {}
    for d in copies.BenchTruth.SUBDIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, (name, group, im) in enumerate(imgs):
        rel = f"originals/{name}.png"
        buf = io.BytesIO()
        im.save(buf, format="PNG")  # so the `exact` copy (JPEG q95 bytes) is another file
        (root / rel).write_bytes(buf.getvalue())
        files[rel] = dict(original=name, kind="original", group=group, params={})
        if i in copied:
            for kind, data in copies.make_copies(im, seed=i).items():
                ext = "png" if data[:4] == b"\x89PNG" else ("webp" if data[:4] == b"RIFF" else "jpg")
                rel = f"copies/{name}__{kind}.{ext}"
                (root / rel).write_bytes(data)
                files[rel] = dict(original=name, kind=kind, group=group, params={})
    (root / "broken" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    files["broken/broken.jpg"] = dict(original=None, kind="broken", group=None, reason="corrupt")
    originals = {name: dict(group=group, file=f"originals/{name}.png") for name, group, _ in imgs}
    return copies.BenchTruth(seed=seed, kinds=("original", *REAL_KINDS), originals=originals, files=files)


def _uid_of(run: Path) -> dict[str, str]:
    t = ledger.read_ingest(run, ["source", "status", "uid"])
    t = t.filter(pc.equal(t["status"], "accepted"))
    return dict(zip(t["source"].to_pylist(), t["uid"].to_pylist()))


def score(root: Path, truth: copies.BenchTruth, uid_of: dict[str, str], rep_of: dict[str, str]) -> dict:
    """recall per kind, distinct originals merged (per group of look-alikes)."""

    def rep(rel: str) -> str | None:
        u = uid_of.get(str(root / rel))
        return rep_of.get(u, u) if u else None

    orig_file = {f["original"]: rel for rel, f in truth.files.items() if f["kind"] == "original"}
    found = {k: [] for k in truth.kinds if k != "original"}
    by_group: dict[str, dict[str, list[bool]]] = {}
    for rel, f in truth.files.items():
        if f["kind"] in found:
            ok = rep(rel) is not None and rep(rel) == rep(orig_file[f["original"]])
            found[f["kind"]].append(ok)
            by_group.setdefault(f["group"], {}).setdefault(f["kind"], []).append(ok)
    groups: dict[str, list[str]] = {}
    for name, rel in orig_file.items():
        groups.setdefault(rep(rel), []).append(name)
    merged = [n for g in groups.values() if len(g) > 1 for n in g]
    return dict(
        recall={k: float(np.mean(v)) for k, v in found.items() if v},
        merged=merged,
        groups={g: {k: float(np.mean(v)) for k, v in kinds.items()} for g, kinds in by_group.items()},
    )


def phash_baseline(root: Path, truth: copies.BenchTruth, radius: int = 8) -> dict:
    """imagehash.phash <= radius, union-find over all pairs (the files as they are)."""
    from lvd.curation.unionfind import UnionFind

    rels = [rel for rel, f in truth.files.items() if f["kind"] != "broken"]
    hashes = []
    for rel in rels:
        with Image.open(root / rel) as im:
            hashes.append(int(str(imagehash.phash(im)), 16))
    h = np.array(hashes, np.uint64)
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    a, b = np.nonzero(np.triu(d <= radius, 1))
    uf = UnionFind(len(rels))
    uf.union_edges(a.astype(np.int64), b.astype(np.int64))
    uid_of = {str(root / rel): rel for rel in rels}
    rep_of = {rel: str(uf.find(i)) for i, rel in enumerate(rels)}
    return score(root, truth, uid_of, rep_of)


def reps(run: Path, table) -> dict[str, str]:
    return dict(zip(table["uid"].to_pylist(), table["duplicate_of"].to_pylist()))


def row(name: str, s: dict, extra: str = "", kinds: tuple[str, ...] = KINDS) -> str:
    cells = " ".join(f"{100 * s['recall'].get(k, 0):7.1f}" for k in kinds)
    return f"{name:22s} {cells} {len(s['merged']):7d}  {extra}"


class CpuMeter:
    """CPU seconds (user + system) of this process and every process below it (the local Ray's
    raylet and workers), sampled every `every` seconds in a thread: a process that exits keeps
    its last sample. Children's cumulative times are not read: a Ray worker reaped outside this
    tree took its CPU with it (a stage then read less CPU than it used, even negative), and
    one reaped inside would count twice. A cost that other load moves less than wall time."""

    def __init__(self, every: float = 0.2):
        import threading

        self.last: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self._thread.start()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def sample(self) -> None:
        from lvd.flows.watchdog import descendants

        tick = os.sysconf("SC_CLK_TCK")
        for pid in [os.getpid(), *descendants(os.getpid())]:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            with self._lock:
                self.last[(pid, int(fields[19]))] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    def total(self) -> float:
        self.sample()
        with self._lock:
            return sum(self.last.values())


class Clock:
    """Wall and CPU seconds per named step."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.meter = CpuMeter()

    def run(self, name: str, fn, *args, **kwargs):
        c, t = self.meter.total(), time.perf_counter()
        out = fn(*args, **kwargs)
        self.wall[name], self.cpu[name] = time.perf_counter() - t, self.meter.total() - c
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", default=None, help="an existing bench dump (default: build one in a temp folder)")
    parser.add_argument("--embedder", default=None, metavar="SPEC", help="backbone proposing candidates for row (c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", type=int, default=FeatureConfig().side, help="copy features' image side (px)")
    parser.add_argument("--n-features", type=int, default=FeatureConfig().n_features, help="ORB keypoints per image")
    parser.add_argument(
        "--max-verify",
        type=int,
        default=CopyDetectConfig().max_verify,
        help="candidates decided per image (--copy-candidates)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="the untuned real check instead (real_dump: Fashion-MNIST train + LFW faces 100-159, 96 px)",
    )
    parser.add_argument(
        "--web-size", type=int, default=None, metavar="PX", help="upscale every image to a longer side of PX first"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lvd-copyq-"))
    root = Path(args.dump) if args.dump else tmp / "dump"
    t = time.perf_counter()
    if args.real:
        truth = real_dump(root)
    else:
        truth = copies.BenchTruth.load(root) if args.dump else copies.write_bench_dump(root, seed=args.seed)
    kinds = REAL_KINDS if args.real else KINDS
    n_files = len(truth.files)
    print(
        f"dump: {n_files} files ({len(truth.originals)} originals) at {root}, built in {time.perf_counter() - t:.1f}s"
    )
    if args.web_size:
        root = web_sized(root, tmp / "web", args.web_size)
    runner.init_ray()
    run = tmp / "run"
    clock = Clock()
    inputs = stages.plan([str(p) for p in truth.input_dirs(root)], 256)
    clock.run("ingest", stages.run_ingest, inputs, run, IngestConfig())
    clock.run("hash dedup", stages.run_dedup, run, DedupConfig())
    n = stages.unique_accepted(run).num_rows
    uid_of = _uid_of(run)
    cfg = CopyDetectConfig(
        max_remove=1.0, max_verify=args.max_verify, features=FeatureConfig(side=args.side, n_features=args.n_features)
    )
    clock.run("copy features", stages_copy.run_copyfeat, run, cfg.features)
    clock.run("copy detection", stages_copy.run_copydetect, run, cfg)
    stats_b, cal_b = stages_copy.copydetect_stats(run), stages_copy.calibration(run)
    dups_b = stages_copy.duplicates(run)
    header = f"{'':22s} " + " ".join(f"{k[:7]:>7s}" for k in kinds) + "  merged"
    print(f"\nrecall per copy kind (%), distinct originals merged; {n} unique accepted images")
    print(header)
    print(row("imagehash pHash<=8", phash_baseline(root, truth), kinds=kinds))
    import pyarrow.parquet as pq

    sa = score(root, truth, uid_of, reps(run, pq.read_table(run / "dedup" / "duplicates.parquet")))
    print(row("(a) hashes", sa, kinds=kinds))
    sb = score(root, truth, uid_of, reps(run, dups_b))
    print(row("(b) copy detector", sb, f"threshold {cal_b.threshold:g} ({cal_b.source})", kinds))
    if args.embedder:
        clock.run("embed (c)", stages_embed.run_embed, run, args.embedder, EmbedConfig())
        shutil.rmtree(run / "copydetect")
        clock.run("copy detection (c)", stages_copy.run_copydetect, run, cfg, proposers=[run / "vectors"])
        sc = score(root, truth, uid_of, reps(run, stages_copy.duplicates(run)))
        print(row("(c) + embedder", sc, f"threshold {stages_copy.calibration(run).threshold:g}", kinds))
    for name, s in (("(b)", sb),):
        if s["merged"]:
            print(f"{name} merged originals: {s['merged'][:12]}")
        print(f"{name} per group of originals:")
        for g, rec in sorted(s["groups"].items()):
            print(row(f"  {g}", dict(recall=rec, merged=[]), kinds=kinds))
    print(f"\ncalibration (b): {cal_b.summary()}")
    print(
        "  known-copy recall per calibration kind: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(cal_b.recall.items()))
    )
    report_cost(clock, stats_b, n, cfg)
    shutil.rmtree(tmp, ignore_errors=True)


def web_sized(root: Path, out: Path, side: int) -> Path:
    """A copy of the dump under `out` with every image upscaled to a longer side of `side` (see
    the module doc); prints the files' sizes."""
    sizes, formats = [], {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
    for p in sorted(root.rglob("*")):
        q = out / p.relative_to(root)
        if p.is_dir():
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        if p.parent.name == "broken" or p.suffix.lower() not in formats:
            shutil.copy(p, q)
            continue
        im = Image.open(p)
        im.load()
        scale = side / max(im.size)
        if scale > 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        fmt = formats[p.suffix.lower()]
        im = im.convert("RGB") if fmt == "JPEG" else im
        im.save(q, format=fmt, **({} if fmt == "PNG" else {"quality": 90}))
        sizes.append((q.stat().st_size, max(im.size)))
    kb = np.array([b for b, _ in sizes]) / 1024
    print(f"web-sized to {side} px: {len(sizes)} images, file KB median {np.median(kb):.0f} mean {kb.mean():.0f}")
    return out


def report_cost(clock: Clock, s: dict, n: int, cfg: CopyDetectConfig) -> None:
    """Per-image wall and CPU time of each stage, the copy detection's split, and the ratio to
    the baseline (ingest + hash dedup) with and without the calibration's fixed cost."""
    print(
        f"\ncost per image on {n} images ({runner_cpus()} CPUs; load average before: {os.getloadavg()[0]:.1f}), "
        f"features at {cfg.features.side} px, {cfg.features.n_features} keypoints, {cfg.max_verify} candidates:"
    )
    print(f"  {'':22s} {'wall ms':>8s} {'CPU ms':>8s}")
    for k in clock.wall:
        print(f"  {k:22s} {1000 * clock.wall[k] / n:8.2f} {1000 * clock.cpu[k] / n:8.2f}")
    wait = s.get("seconds_calibrate_wait", s["seconds_calibrate"])
    print(
        f"  copy detection (b) split (wall): reading features {1000 * s['seconds_read'] / n:.2f} ms, candidates "
        f"{1000 * s['seconds_candidates'] / n:.2f} ms, calibration {s['seconds_calibrate']:.1f} s in all (beside "
        f"the candidates; {wait:.1f} s after them), verification {1000 * s['seconds_verify'] / n:.2f} ms, "
        f"chain split {1000 * s['seconds_split'] / n:.2f} ms"
    )
    print(
        f"  pairs verified: {s['candidates']} ({s['candidates'] / n:.1f} per image), "
        f"{s['candidates'] / max(s['seconds_verify'], 1e-9):.0f} pairs/s"
    )
    for what, times in (("wall", clock.wall), ("CPU", clock.cpu)):
        base = times["ingest"] + times["hash dedup"]
        full = base + times["copy features"] + times["copy detection"]
        print(
            f"ratio ({what}) vs baseline 'ingest + hash dedup' ({1000 * base / n:.2f} ms/image): "
            f"curation with the copy detector {full / base:.2f}x"
        )
    base = clock.wall["ingest"] + clock.wall["hash dedup"]
    full = base + clock.wall["copy features"] + clock.wall["copy detection"] - wait
    print(
        f"ratio (wall) without the calibration's fixed {wait:.1f} s after the candidates (a pool where it "
        f"amortises): {full / base:.2f}x"
    )


def runner_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


if __name__ == "__main__":
    main()
