"""Model-free quality filters, computed during ingest on the small grey decode it already makes.

Each filter is one number of a grey thumbnail (shorter side at most `THUMB_SHORT` = 64 px,
longer side at most 256: the scale ingest's JPEG draft decode reaches anyway, so the filters
add no decode) compared with a threshold, and each rejection names its reason and measured
value:

- `near_constant`: standard deviation of the grey levels below `min_contrast` (a flat colour,
  a blank scan; JPEG noise on a flat image is about 1 level).
- `extreme_aspect`: longer side / shorter side above `max_aspect` (banners, 1:20 strips),
  from the header sizes after EXIF orientation.
- `too_blurry`: variance of the 4-neighbour Laplacian of the thumbnail over the variance of its
  levels (so contrast does not count) below `min_sharpness`, or the Laplacian's variance itself
  below `min_laplacian` (a blurred texture keeps almost no contrast, and JPEG noise then makes
  the ratio look sharp). At 64 px only heavy blur shows (a Gaussian of about 3% of the image
  side and more): a slightly soft photo is sharp at that scale, so this filter removes
  unusable images, not imperfect ones.
- `mostly_border`: uniform margins (rows / columns at the edges whose levels stay within
  `border_tolerance` of the edge colour) covering more than `max_border` of the area: a
  small picture on a large canvas, a frame, a letterbox around almost nothing.
Not built: a `mostly_text` filter. At this scale text strokes blur into grey and a page looks
like a low-contrast photo; telling them apart needs a larger decode or a model.

Checks run in that order and the first that fires is the reason. Thresholds are calibrated on
the photos scikit-image and scikit-learn ship (README, "Pool hygiene"): none of them, nor
200 random crops of them, is rejected. A threshold of None turns that filter off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from lvd.curation.faces import FaceConfig
    from lvd.curation.nsfw import NsfwConfig

THUMB_SHORT = 64
THUMB_LONG = 256


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    min_contrast: float | None = 4.0  # std of grey levels (0..255)
    max_aspect: float | None = 8.0  # longer / shorter side
    min_sharpness: float | None = 0.02  # var(Laplacian) / var(levels) on the 64-px thumbnail
    min_laplacian: float = 3.0  # var(Laplacian) in grey levels^2 (part of too_blurry)
    max_border: float | None = 0.75  # fraction of the area in uniform margins
    border_tolerance: float = 10.0  # grey levels a margin row / column may stray from the edge colour

    def __post_init__(self) -> None:
        for name in ("min_contrast", "max_aspect", "min_sharpness", "max_border"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"quality {name}={value}: use a value >= 0, or None to turn the filter off")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"quality max_aspect={self.max_aspect}: an aspect ratio is >= 1")


@dataclass(frozen=True)
class Rejection:
    reason: str
    value: float  # the measured number the threshold cut

    def detail(self) -> dict:
        return {"metric": self.reason, "value": round(float(self.value), 4)}


def thumb(gray: Image.Image) -> np.ndarray:
    """float64 HxW levels of `gray` (mode L) shrunk to the filters' scale (see module doc)."""
    w, h = gray.size
    scale = min(1.0, THUMB_SHORT / min(w, h), THUMB_LONG / max(w, h))
    if scale < 1.0:
        gray = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float64)


def laplacian_var(x_HW: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels."""
    if min(x_HW.shape) < 3:
        return 0.0
    lap = (x_HW[:-2, 1:-1] + x_HW[2:, 1:-1] + x_HW[1:-1, :-2] + x_HW[1:-1, 2:]) - 4 * x_HW[1:-1, 1:-1]
    return float(lap.var())


def sharpness(x_HW: np.ndarray) -> float:
    """`laplacian_var` over the variance of the levels: high-frequency energy per unit of
    contrast (0 for a flat image)."""
    var = float(x_HW.var())
    return laplacian_var(x_HW) / var if var > 0 else 0.0


def border_fraction(x_HW: np.ndarray, tolerance: float) -> float:
    """Fraction of the area in uniform margins: from each edge, rows / columns whose every level
    is within `tolerance` of that edge's median colour."""
    h, w = x_HW.shape
    top = _uniform_run(x_HW, tolerance)
    bottom = _uniform_run(x_HW[::-1], tolerance)
    left = _uniform_run(x_HW.T, tolerance)
    right = _uniform_run(x_HW.T[::-1], tolerance)
    inner_h, inner_w = max(0, h - top - bottom), max(0, w - left - right)
    return 1.0 - inner_h * inner_w / (h * w)


def _uniform_run(x_HW: np.ndarray, tolerance: float) -> int:
    """How many leading rows stay within `tolerance` of the first row's median."""
    ref = np.median(x_HW[0])
    ok = np.all(np.abs(x_HW - ref) <= tolerance, axis=1)
    return len(ok) if ok.all() else int(np.argmin(ok))


def check_quality(x_HW: np.ndarray, width: int, height: int, cfg: QualityConfig) -> Rejection | None:
    """The first quality filter `x_HW` (a `thumb`) fails, or None (see module doc)."""
    if cfg.min_contrast is not None and (std := float(x_HW.std())) < cfg.min_contrast:
        return Rejection("near_constant", std)
    if cfg.max_aspect is not None and (aspect := max(width, height) / max(1, min(width, height))) > cfg.max_aspect:
        return Rejection("extreme_aspect", aspect)
    sharp = sharpness(x_HW) if cfg.min_sharpness is not None else None
    if sharp is not None and (sharp < cfg.min_sharpness or laplacian_var(x_HW) < cfg.min_laplacian):
        return Rejection("too_blurry", sharp)
    if cfg.max_border is not None and (border := border_fraction(x_HW, cfg.border_tolerance)) > cfg.max_border:
        return Rejection("mostly_border", border)
    return None


# ---------------------------------------------------------------- the ingest hooks


@dataclass(frozen=True, kw_only=True)
class HygieneConfig:
    """The per-input hygiene stages ingest runs (`IngestConfig.hygiene`); each off when None / empty.
    Dicts are accepted for every part (Prefect parameters are plain JSON)."""

    quality: QualityConfig | None = None
    url_block: tuple[str, ...] = ()  # rules (lvd.curation.urlfilter.read_rules)
    url_allow: tuple[str, ...] = ()
    faces: FaceConfig | None = None  # detect faces (the shard stage blurs them)
    nsfw: NsfwConfig | None = None

    def __post_init__(self) -> None:
        from lvd.curation.faces import FaceConfig
        from lvd.curation.nsfw import NsfwConfig

        for name, cls in (("quality", QualityConfig), ("faces", FaceConfig), ("nsfw", NsfwConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))
        object.__setattr__(self, "url_block", tuple(self.url_block))
        object.__setattr__(self, "url_allow", tuple(self.url_allow))

    @property
    def decodes(self) -> bool:
        """Whether an accepted image is decoded a second time (faces, nsfw)."""
        return self.faces is not None or self.nsfw is not None


def check_source(meta, cfg: HygieneConfig) -> tuple[str, dict] | None:
    """Before decoding: (`url_blocked`, detail) when the url lists block the input."""
    if not (cfg.url_block or cfg.url_allow):
        return None
    from lvd.curation.urlfilter import check_url

    verdict = check_url(meta, cfg.url_block, cfg.url_allow)
    return ("url_blocked", verdict.detail()) if verdict else None


def check_thumb(small: Image.Image, width: int, height: int, cfg: HygieneConfig) -> tuple[str, dict] | None:
    """On ingest's small grey decode (oriented): the quality filters' (reason, detail), or None."""
    if cfg.quality is None:
        return None
    rej = check_quality(thumb(small), width, height, cfg.quality)
    return (rej.reason, rej.detail()) if rej else None


def check_decoded(data: bytes, oriented: tuple[int, int], cfg: HygieneConfig) -> tuple[str | None, dict]:
    """On a second decode of an accepted image's bytes: (`nsfw` or None, detail with the nsfw
    score and the face boxes in oriented full-size coordinates, `oriented` = (width, height))."""
    import io

    from lvd.curation.pixels import apply_orientation, orientation, to_rgb

    with Image.open(io.BytesIO(data)) as img:
        tag = orientation(img)
    orient = lambda im: apply_orientation(im, tag)  # noqa: E731
    detail: dict = {}
    if cfg.nsfw is not None:
        from lvd.curation import nsfw

        with Image.open(io.BytesIO(data)) as rgb:
            if rgb.format in ("JPEG", "MPO"):
                rgb.draft("RGB", (cfg.nsfw.input_size, cfg.nsfw.input_size))
            s = nsfw.score(orient(to_rgb(rgb.convert("RGB") if rgb.mode == "CMYK" else _loaded(rgb))), cfg.nsfw)
        detail["nsfw"] = round(s, 4)
        if s >= cfg.nsfw.threshold:
            return "nsfw", detail
    if cfg.faces is not None:
        from lvd.curation.faces import detect_in_bytes

        with Image.open(io.BytesIO(data)) as img:
            detail["faces"] = [list(b) for b in detect_in_bytes(img, oriented, orient, cfg.faces)]
    return None, detail


def _loaded(img: Image.Image) -> Image.Image:
    img.load()
    return img


def from_options(opts: dict | None) -> tuple[HygieneConfig | None, int | None]:
    """(`IngestConfig.hygiene`, per-domain cap) from the flow's `hygiene` parameter: plain JSON
    with `quality` (dict of QualityConfig fields, {} = calibrated defaults; absent = off),
    `url_blocklist` / `url_allowlist` (rule files, read here), `max_per_domain`, `faces` (dict
    of FaceConfig fields, {} = bundled cascade), `nsfw` (dict of NsfwConfig fields, `model`
    required). The rule files' contents go into the config, so an edited file re-runs ingest."""
    from lvd.curation.urlfilter import read_rules

    opts = dict(opts or {})
    unknown = set(opts) - {"quality", "url_blocklist", "url_allowlist", "max_per_domain", "faces", "nsfw"}
    if unknown:
        raise ValueError(
            f"hygiene options {sorted(unknown)} unknown: use quality, url_blocklist, url_allowlist, "
            "max_per_domain, faces, nsfw"
        )
    cfg = HygieneConfig(
        quality=opts.get("quality"), faces=opts.get("faces"), nsfw=opts.get("nsfw"),
        url_block=read_rules(opts["url_blocklist"]) if opts.get("url_blocklist") else (),
        url_allow=read_rules(opts["url_allowlist"]) if opts.get("url_allowlist") else (),
    )  # fmt: skip
    if cfg.nsfw is not None:  # a model that does not load or run fails here, not in every worker
        from lvd.curation import nsfw

        try:
            nsfw.score(Image.new("RGB", (32, 32)), cfg.nsfw)
        except Exception as e:
            raise ValueError(f"nsfw model {cfg.nsfw.model!r} does not score a test image: {e}") from None
    on = cfg.quality or cfg.faces or cfg.nsfw or cfg.url_block or cfg.url_allow
    return (cfg if on else None), opts.get("max_per_domain")


# ---------------------------------------------------------------- reporting

REASONS = ("url_blocked", "domain_capped", "nsfw", "near_constant", "extreme_aspect", "too_blurry", "mostly_border")


def hygiene_records(run_dir) -> list[dict]:
    """Every ingest record a hygiene stage decided on (rejected with one of `REASONS`, or with
    faces found), with its partition index: source, status, reason, uid, detail, part."""
    import pyarrow.parquet as pq

    from lvd.curation import rundir

    out = []
    for index, path in zip(sorted(rundir.ingest_markers(run_dir)), rundir.ingest_manifests(run_dir)):
        if "detail" not in pq.read_schema(path).names:
            continue
        t = rundir.apply_caps(run_dir, pq.read_table(path, columns=["source", "status", "reason", "uid", "detail"]))
        for r in t.to_pylist():
            if r["reason"] in REASONS or (r["status"] == "accepted" and r["detail"] and '"faces": [[' in r["detail"]):
                out.append(dict(r, part=index))
    return out


def example_bytes(records: list[dict], partitions, limits=None) -> dict[str, bytes]:
    """source -> bytes of the given records, read again from their inputs (rejected images
    have no blob): one pass over each partition that holds one (`partitions` by index)."""
    from lvd.curation.sources import SourceLimits, iter_items

    want: dict[int, set[str]] = {}
    for r in records:
        want.setdefault(r["part"], set()).add(r["source"])
    found: dict[str, bytes] = {}
    by_index = {p.index: p for p in partitions}
    for index, sources in sorted(want.items()):
        if index not in by_index:
            continue
        for item in iter_items(by_index[index], limits or SourceLimits()):
            if item.source in sources and item.data is not None:
                found[item.source] = item.data
    return found
