"""Shard writing and checking speed, as ratios against baselines run in the same process.

    .venv/bin/python benchmarks/shard_write.py [--samples 200] [--rounds 3]

Inputs: the real photos of `lvd.curation.copies` as JPEG q95 (plus PNG copies for the
re-encode path), repeated with distinct uids. Rounds are interleaved and the median is kept.
- baseline: webdataset's TarWriter writing the same bytes (no decoding): the tar + disk floor.
- keep: write_shards keeping JPEG originals (only headers are parsed).
- reencode: every image decoded and re-encoded (keep_original_jpeg=False).
- max_side=256 with libjpeg draft downscaling (what write_shards does) vs a full decode first.
- check_shards with and without decoding every JPEG, vs reading the tars with plain tarfile.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageOps

from lvd.curation.copies import encode_original, real_photos
from lvd.curation.pixels import to_rgb
from lvd.curation.shards import ShardConfig, ShardSample, sample_json, write_shards
from lvd.curation.shards.check import check_shards
from lvd.curation.shards.image import store_image


def make_samples(n: int) -> list[ShardSample]:
    photos = [img.convert("RGB") for _, img in real_photos()]
    encoded = [encode_original(img) for img in photos]
    out = []
    for i in range(n):
        data = encoded[i % len(encoded)]
        w, h = photos[i % len(photos)].size
        out.append(ShardSample(uid=f"{i:064x}", source=f"/dump/{i}.jpg", width=w, height=h, data=data))
    return out


def wds_baseline(samples: list[ShardSample], out: Path, shard_size: int) -> None:
    for start in range(0, len(samples), shard_size):
        with wds.TarWriter(str(out / f"shard-{start // shard_size:06d}.tar"), mtime=0) as sink:
            for j, s in enumerate(samples[start : start + shard_size]):
                sink.write({"__key__": f"{start + j:09d}", "jpg": s.data, "json": {"uid": s.uid, "source": s.source}})


def store_without_draft(data: bytes, max_side: int) -> bytes:
    """The re-encode path with a full-size decode before the Lanczos resize."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = to_rgb(ImageOps.exif_transpose(img))
    scale = max_side / max(rgb.size)
    rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def read_tars(folder: Path) -> None:
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                tar.extractfile(m).read()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200, help="samples per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = ap.parse_args()
    samples = make_samples(args.samples)
    png = [ShardSample(uid=s.uid, source=s.source, width=s.width, height=s.height,
                       data=_png(s.data)) for s in samples[: len(samples) // 4]]  # fmt: skip
    mb = sum(len(s.data) for s in samples) / 1e6
    root = Path(tempfile.mkdtemp(prefix="lvd-shard-bench-"))
    small = ShardConfig(shard_size=100, max_side=256)
    runs: dict[str, Callable[[Path], object]] = {
        "baseline (wds.TarWriter, bytes as given)": lambda d: wds_baseline(samples, d, 100),
        "write_shards keep originals": lambda d: write_shards(samples, d, ShardConfig(shard_size=100)),
        "write_shards re-encode all": lambda d: write_shards(
            samples, d, ShardConfig(shard_size=100, keep_original_jpeg=False)
        ),
        "write_shards max_side=256 (draft)": lambda d: write_shards(samples, d, small),
        "store max_side=256, full decode": lambda d: [store_without_draft(s.data, 256) for s in samples],
        "store PNG sources (1/4 of n)": lambda d: [store_image(s.data, max_side=None, quality=95) for s in png],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    checks: dict[str, list[float]] = {
        "read tars (tarfile)": [],
        "check_shards decode=False": [],
        "check_shards decode=True": [],
    }
    for r in range(args.rounds):
        for i, (name, fn) in enumerate(runs.items()):
            out = root / f"r{r}-{i}"
            out.mkdir()
            times[name].append(timed(lambda fn=fn, out=out: fn(out)))
        keep = root / f"r{r}-1"
        checks["read tars (tarfile)"].append(timed(lambda keep=keep: read_tars(keep)))
        checks["check_shards decode=False"].append(timed(lambda keep=keep: check_shards(keep, decode=False)))
        checks["check_shards decode=True"].append(timed(lambda keep=keep: check_shards(keep)))
    print(
        f"{args.samples} samples, {mb:.1f} MB of JPEG, median of {args.rounds} rounds; json e.g. {sample_json(samples[0], store_image(samples[0].data, max_side=256, quality=95))[:60]!r}"
    )
    _table(times, "baseline (wds.TarWriter, bytes as given)", args.samples)
    _table(checks, "read tars (tarfile)", args.samples)
    draft, full = (
        statistics.median(times[k]) for k in ("write_shards max_side=256 (draft)", "store max_side=256, full decode")
    )
    print(f"draft downscale speed-up on resize: {full / draft:.2f}x")


def _png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _table(times: dict[str, list[float]], baseline: str, n: int) -> None:
    base = statistics.median(times[baseline])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<42} {t * 1e3:8.1f} ms  {n / t:8.1f} samples/s  {t / base:6.2f}x baseline")


if __name__ == "__main__":
    main()
