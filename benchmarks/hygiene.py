"""Pool hygiene: quality-filter calibration, face-detector recall, and each stage's cost vs ingest.

    .venv/bin/python benchmarks/hygiene.py            # all three sections
    .venv/bin/python benchmarks/hygiene.py --only cost --threads 2

calibration: the quality filters (lvd.curation.hygiene) on the photos scikit-image and
scikit-learn ship, on random crops of them, and on junk made from them (flat colour, heavy
blur, 1:20 strips, a picture on a large canvas): false rejections of clean photos and the
rate junk is caught. Every image goes through ingest (`ingest_item`), as in a run.
recall: the face detector on the faces those packages ship (skimage astronaut, camera and
the 100 LFW faces of skimage.data.lfw_subset, upscaled) and false detections on the rest.
cost: per-image time of each hygiene stage's own work next to the ingest baseline (plain
`ingest_item`, same images, same process), in rounds alternating the two, printed as the median
ratio; `--threads` pins torch / OpenCV threads.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageFilter

from lvd.curation import testdata
from lvd.curation.faces import FaceConfig, detect_faces
from lvd.curation.hygiene import QualityConfig
from lvd.curation.ingest import IngestConfig, ingest_item
from lvd.curation.sources import RawItem

# Photographs the packages ship (colorwheel, logo, text, page... are graphics, not photos).
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "cell",
    "stereo_motorcycle",
    "china",
    "flower",
)


def photo(name: str) -> np.ndarray:
    a = testdata.photo(name)
    return a[0] if isinstance(a, tuple) else a


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` random crops (25..100% of the shorter side, any place) of the photos, at 128..512 px."""
    rng, photos, out = np.random.default_rng(seed), [photo(p) for p in PHOTOS], []
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        size = int(rng.integers(128, 513))
        out.append(np.asarray(Image.fromarray(a[y : y + side, x : x + side]).resize((size, size))))
    return out


def junk() -> dict[str, list[np.ndarray]]:
    """Junk made from the photos, by the reason it should get."""
    photos = [photo(p) for p in PHOTOS]
    rgb = [np.dstack([p] * 3) if p.ndim == 2 else p for p in photos]
    flat = [np.full((200, 300, 3), c, np.uint8) for c in ((120, 40, 200), (255, 255, 255), (0, 0, 0), (90, 90, 90))]
    blur = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(max(p.shape[:2]) / 25))) for p in rgb]
    strips = [np.asarray(Image.fromarray(p).resize((800, 40))) for p in rgb]
    canvas = []
    for p in rgb:
        c = Image.new("RGB", (480, 480), (255, 255, 255))
        c.paste(Image.fromarray(p).resize((96, 96)), (192, 192))
        canvas.append(np.asarray(c))
    return {"near_constant": flat, "too_blurry": blur, "extreme_aspect": strips, "mostly_border": canvas}


def rejected(arrs: list[np.ndarray], cfg: IngestConfig) -> list[str]:
    reasons = []
    for i, a in enumerate(arrs):
        rec, _ = ingest_item(RawItem(source=f"x{i}.jpg", data=jpeg(a), error=None), cfg)
        reasons.append(rec["reason"])
    return reasons


def calibration() -> None:
    cfg = IngestConfig(hygiene={"quality": {}})
    print(f"== quality filters (defaults: {QualityConfig()})")
    for label, arrs in (("package photos", [photo(p) for p in PHOTOS]), ("random crops of them", crops(400))):
        bad = [r for r in rejected(arrs, cfg) if r is not None]
        rate = 100 * len(bad) / len(arrs)
        print(f"clean {label}: {len(bad)} of {len(arrs)} rejected ({rate:.1f}%) {sorted(set(bad))}")
    for want, arrs in junk().items():
        got = rejected(arrs, cfg)
        others = sorted({str(r) for r in got if r != want})
        print(f"junk {want}: {sum(r == want for r in got)} of {len(arrs)} caught with that reason; others {others}")


def face_sets() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images with one face each, images with none) from the packages."""
    import skimage.data

    lfw = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 floats
    up = lambda a: np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC))
    faces = [photo("astronaut")] + [up(a) for a in lfw[:100]]
    none = [photo(p) for p in PHOTOS if p not in ("astronaut", "camera")] + [up(a) for a in lfw[100:]]
    return faces, none


def recall(fcfg: FaceConfig) -> None:
    faces, none = face_sets()
    found = [len(detect_faces(_gray(a), fcfg)) for a in faces]
    false = [len(detect_faces(_gray(a), fcfg)) for a in none]
    print(f"== face detector {fcfg.detector or 'haarcascade_frontalface_alt2.xml'}")
    print(
        f"astronaut (1 face): {found[0]} found; camera (cameraman, face in profile-ish, small): "
        f"{len(detect_faces(_gray(photo('camera')), fcfg))} found"
    )
    print(f"LFW faces (skimage.data.lfw_subset, 100, upscaled 25->100 px): recall {sum(f >= 1 for f in found[1:])}/100")
    print(
        f"images without faces ({len(none)}: package photos + LFW non-faces): "
        f"{sum(f >= 1 for f in false)} with a detection"
    )


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a).convert("L")


def cost(repeat: int) -> None:
    """Each stage's own work, timed in rounds alternating with the ingest baseline (the shared
    machine's load drifts): the median of the per-round ratios."""
    import cv2
    import torch

    from lvd.curation import hygiene as hy
    from lvd.curation.ingest import _small_gray
    from lvd.curation.shards.image import store_image
    from lvd.curation.urlfilter import cap_domains

    arrs = [np.asarray(Image.fromarray(a).resize((512, 384))) for a in crops(48, seed=1)]
    urls = [{"json": {"url": f"https://img{i}.site{i % 9}.example/{i}.jpg"}} for i in range(len(arrs))]
    items = [RawItem(source=f"x{i}.jpg", data=jpeg(a), error=None, meta=m) for i, (a, m) in enumerate(zip(arrs, urls))]
    smalls = [_small_gray(Image.open(io.BytesIO(it.data)), 64) for it in items]
    base_cfg = IngestConfig()
    quality = hy.HygieneConfig(quality={})
    block = hy.HygieneConfig(url_block=tuple(f"d{i}.example" for i in range(20)))
    faces, nsfw_cfg = hy.HygieneConfig(faces={}), hy.HygieneConfig(nsfw={"model": _nsfw_model()})
    pairs = [(f"{i:064x}", f"https://d{i % 50}.example/{i}.jpg") for i in range(len(items))]
    stages = {
        "quality filters (on ingest's small decode)": lambda: [hy.check_thumb(s, 512, 384, quality) for s in smalls],
        "url blocklist (20 domain rules, none match)": lambda: [hy.check_source(it.meta, block) for it in items],
        "face detection (second decode, Haar cascade)": lambda: [
            hy.check_decoded(it.data, (512, 384), faces) for it in items
        ],
        "nsfw (second decode, scripted 1-layer model)": lambda: [
            hy.check_decoded(it.data, (512, 384), nsfw_cfg) for it in items
        ],
        "domain cap (global count over the urls)": lambda: cap_domains(pairs, 10),
        "shard store with one face blurred (decode, blur, 4:4:4 re-encode)": lambda: [
            store_image(it.data, max_side=None, quality=95, faces=((100, 80, 120, 120),)) for it in items
        ],
        "shard store, original JPEG kept (no face)": lambda: [
            store_image(it.data, max_side=None, quality=95) for it in items
        ],
    }
    base = lambda: [ingest_item(it, base_cfg) for it in items]  # noqa: E731
    base()
    print(
        f"== cost per image, {len(items)} 512x384 JPEGs, torch threads {torch.get_num_threads()}, OpenCV threads "
        f"{cv2.getNumThreads()}; baseline: ingest_item with no hygiene, {repeat} rounds alternating with each stage"
    )
    for name, fn in stages.items():
        fn()  # warm: model / cascade loads once per worker process
        ratios, times = [], []
        for _ in range(repeat):
            b, t = _best(base, 1), _best(fn, 1)
            ratios.append(t / b)
            times.append((b / len(items), t / len(items)))
        b_ms, t_ms = (1e3 * float(np.median([x[i] for x in times])) for i in (0, 1))
        print(f"{name}: {t_ms:.3f} ms/image vs ingest {b_ms:.2f} ms = {np.median(ratios):.3f}x ingest")


def _nsfw_model() -> str:
    import tempfile

    import torch

    class Red(torch.nn.Module):
        def forward(self, x):
            return (x[:, 0].mean((1, 2)) - x[:, 1:].mean((1, 2, 3))).unsqueeze(1)

    path = tempfile.mkdtemp() + "/red.pt"
    torch.jit.script(Red()).save(path)
    return path


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["calibration", "recall", "cost"], default=None)
    p.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads (default 2: the 2-core budget)")
    p.add_argument("--repeat", type=int, default=5, help="timing rounds (calibration: unused)")
    p.add_argument("--face-detector", default=None, help="a cascade XML or YuNet ONNX file for the recall section")
    args = p.parse_args()
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.only in (None, "calibration"):
        calibration()
    if args.only in (None, "recall"):
        recall(FaceConfig(detector=args.face_detector))
    if args.only in (None, "cost"):
        cost(args.repeat)


if __name__ == "__main__":
    main()
