"""Face detection at ingest and face blurring at shard time; no model is downloaded.

Detector: OpenCV's bundled Haar cascade `haarcascade_frontalface_alt2.xml` (opencv-python-
headless ships it in `cv2.data.haarcascades`) by default. `FaceConfig.detector` plugs in a
local file instead: a cascade XML (Haar or LBP, e.g. scikit-image's
`lbpcascade_frontalface_opencv.xml`) or a YuNet ONNX model (`cv2.FaceDetectorYN`; none ships
in a package, so that path needs the user's own file). Its recall on the faces the packages
ship is in the README (benchmarks/hygiene.py).

Detection runs on a grey decode whose longer side is at most `detect_side` (JPEG draft
decode), after EXIF orientation; boxes are returned in the coordinates of the full image as
a reader sees it (oriented), so the shard writer can scale them to whatever size it stores.

Blurring (`blur_faces`) replaces each box, grown by `margin` and snapped outward to the
8-pixel JPEG block grid, with a strong Gaussian blur of itself. Every pixel outside those
blocks is left exactly as decoded; the shard writer stores the result as a 4:4:4 JPEG, whose
8x8 blocks are coded independently, so outside the blurred blocks the stored JPEG decodes
exactly as the same image stored without blurring.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

Box = tuple[int, int, int, int]  # x, y, width, height
BLOCK = 8  # JPEG block side: blurred regions are whole blocks


@dataclass(frozen=True, kw_only=True)
class FaceConfig:
    detector: str | None = None  # cascade XML or YuNet .onnx; None: OpenCV's bundled frontal-face Haar cascade
    detector_sha256: str = ""  # content hash of `detector` (set from the file: a changed file re-runs ingest)
    detect_side: int = 640  # longer side of the decode the detector sees
    scale_factor: float = 1.1  # cascade pyramid step
    min_neighbors: int = 5  # cascade: overlapping hits a face needs
    min_face: int = 20  # smallest face side, pixels of the detection decode
    score_threshold: float = 0.7  # YuNet only

    def __post_init__(self) -> None:
        if self.detector is not None:
            if not os.path.isfile(self.detector):
                raise ValueError(f"face detector {self.detector!r}: no such file (a cascade .xml or a YuNet .onnx)")
            if not self.detector.lower().endswith((".xml", ".onnx")):
                raise ValueError(f"face detector {self.detector!r}: use a cascade .xml or a YuNet .onnx file")
            if not self.detector_sha256:
                object.__setattr__(self, "detector_sha256", _sha256(self.detector))
        if self.detect_side < 64 or self.scale_factor <= 1.0 or self.min_neighbors < 0 or self.min_face < 8:
            raise ValueError(
                f"face config {self}: use detect_side >= 64, scale_factor > 1, min_neighbors >= 0, min_face >= 8"
            )


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def default_cascade() -> str:
    import cv2

    return os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_alt2.xml")


@functools.lru_cache(maxsize=4)
def _detector(path: str, sha: str, kind: str):
    """One loaded detector per process and file (Ray workers reuse it across partitions)."""
    import cv2

    if kind == "onnx":
        return cv2.FaceDetectorYN.create(path, "", (320, 320))
    try:
        cascade = cv2.CascadeClassifier(path)
    except Exception:  # cv2.error (a SystemError in some builds) for unparsable XML
        cascade = None
    if cascade is None or cascade.empty():
        raise ValueError(f"face detector {path!r}: OpenCV cannot load it as a cascade")
    return cascade


def detect_faces(img: Image.Image, cfg: FaceConfig) -> list[Box]:
    """Face boxes in `img`'s own pixel coordinates (any mode; a loaded, oriented image)."""
    import cv2

    path = cfg.detector or default_cascade()
    if path.lower().endswith(".onnx"):
        det = _detector(path, cfg.detector_sha256, "onnx")
        bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
        det.setInputSize((bgr.shape[1], bgr.shape[0]))
        det.setScoreThreshold(cfg.score_threshold)
        _, found = det.detect(bgr)
        rows = [] if found is None else [r[:4] for r in found]
    else:
        det = _detector(path, cfg.detector_sha256, "cascade")
        gray = cv2.equalizeHist(np.asarray(img.convert("L")))
        rows = det.detectMultiScale(
            gray, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(cfg.min_face, cfg.min_face)
        )
    return sorted(_clip_box(r, img.size) for r in rows if r[2] > 0 and r[3] > 0)


def _clip_box(r, size: tuple[int, int]) -> Box:
    x0, y0 = max(0, int(round(r[0]))), max(0, int(round(r[1])))
    x1, y1 = min(size[0], int(round(r[0] + r[2]))), min(size[1], int(round(r[1] + r[3])))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def detect_in_bytes(img: Image.Image, oriented: tuple[int, int], orientation_fix, cfg: FaceConfig) -> list[Box]:
    """Boxes in full oriented-image coordinates from an opened (not loaded) image: draft decode
    to about `detect_side`, orient with `orientation_fix`, detect, scale back."""
    if img.format in ("JPEG", "MPO"):
        img.draft("L", (cfg.detect_side, cfg.detect_side))
    small = orientation_fix(img.convert("L") if img.mode != "L" else img)
    if max(small.size) > cfg.detect_side:
        small = small.copy()
        small.thumbnail((cfg.detect_side, cfg.detect_side), Image.Resampling.BILINEAR)
    sx, sy = oriented[0] / small.size[0], oriented[1] / small.size[1]
    return [_clip_box((x * sx, y * sy, w * sx, h * sy), oriented) for x, y, w, h in detect_faces(small, cfg)]


def blur_region(box: Box, size: tuple[int, int], margin: float = 0.15) -> Box:
    """`box` grown by `margin` of its size on each side and snapped outward to the 8-px grid."""
    x, y, w, h = box
    mx, my = w * margin, h * margin
    x0, y0 = int(np.floor((x - mx) / BLOCK)) * BLOCK, int(np.floor((y - my) / BLOCK)) * BLOCK
    x1, y1 = int(np.ceil((x + w + mx) / BLOCK)) * BLOCK, int(np.ceil((y + h + my) / BLOCK)) * BLOCK
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(size[0], x1), min(size[1], y1)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def scale_boxes(boxes, src: tuple[int, int], dst: tuple[int, int]) -> list[Box]:
    """Boxes given for an image of size `src` in the coordinates of the same image at `dst`."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return [_clip_box((x * sx, y * sy, w * sx, h * sy), dst) for x, y, w, h in boxes]


def blur_faces(rgb: Image.Image, boxes) -> Image.Image:
    """A copy of `rgb` with every `blur_region` of `boxes` blurred beyond recognition (Gaussian,
    radius a quarter of the region's shorter side); every other pixel unchanged."""
    out = rgb.copy()
    for box in boxes:
        x, y, w, h = blur_region(tuple(box), rgb.size)
        if w == 0 or h == 0:
            continue
        region = rgb.crop((x, y, x + w, y + h))
        out.paste(region.filter(ImageFilter.GaussianBlur(max(2.0, min(w, h) / 4))), (x, y))
    return out
