"""`embed(model, images, out)`: CLS (and optionally patch) features of a folder or of shards.

Inputs are split into units (`images.plan_units`: chunks of files, or one shard each). Small
inputs run in this process with one model; above `ray_above` images (or with `ray=True`) the
units go to long-lived Ray actors, each loading the model once (`ActorConfig` of the curation
embed stage: one per GPU, else one). Both paths run the same `embed_unit`, and the driver
writes results in unit order, so row i is the same image either way. Output layout:
`lvd.tools.store`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lvd.curation.actor_runner import ActorConfig
from lvd.tools.features import (
    FeatureConfig,
    check_size,
    crop_pixels,
    extract_pixels,
    load_model,
    patch_size,
    resolve_device,
)
from lvd.tools.images import ImageRef, Raw, Unit, decode, plan_units, read_raw
from lvd.tools.store import Embeddings, FeatureWriter, Skipped


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    chunk: int = 256  # folder images per unit of work (a shard is always one unit)
    ray: bool | None = None  # None: Ray when the input holds more than `ray_above` images
    ray_above: int = 2000
    actors: ActorConfig = field(default_factory=ActorConfig)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk}: use at least 1 image per unit")
        if self.ray_above < 0:
            raise ValueError(f"ray_above={self.ray_above}: use 0 (always Ray) or an image count")


@dataclass(frozen=True)
class UnitResult:
    index: int
    refs: list[ImageRef]
    cls_BD: np.ndarray  # float32
    patches_BhwD: np.ndarray | None  # float16
    skipped: list[Skipped]
    grid: tuple[int, int] | None  # patch grid (h, w) when patches are kept


class UnitEmbedder:
    """One loaded model; `__call__(unit)` reads, decodes (on `decode_threads` threads, crops
    only kept) and embeds the unit's images, `batch_size` per forward pass."""

    def __init__(self, model: str | Path | torch.nn.Module, cfg: FeatureConfig) -> None:
        if isinstance(model, torch.nn.Module):
            self.model = model.eval().requires_grad_(False).to(resolve_device(cfg.device))
        else:
            self.model = load_model(model, device=cfg.device)
        check_size(self.model, cfg.size)
        self.cfg = cfg
        side = cfg.size // patch_size(self.model)
        self.grid = (side, side) if cfg.patches else None

    def _prepare(self, raw: Raw) -> tuple[ImageRef, np.ndarray | None, str | None]:
        item = decode(raw, self.cfg.resize_side)
        if item.image is None:
            return item.ref, None, item.reason
        return item.ref, crop_pixels(item.image, self.cfg), None

    def __call__(self, unit: Unit) -> UnitResult:
        refs, pixels, skipped = [], [], []
        with ThreadPoolExecutor(self.cfg.decode_threads) as pool:
            for ref, crop, reason in pool.map(self._prepare, read_raw(unit)):
                if crop is None:
                    skipped.append(Skipped(ref, reason))
                else:
                    refs.append(ref)
                    pixels.append(crop)
        feats = extract_pixels(self.model, pixels, self.cfg)
        patches = feats.patches_BhwD.astype(np.float16) if self.grid else None
        return UnitResult(unit.index, refs, feats.cls_BD, patches, skipped, self.grid)


def embed(
    model: str | Path | torch.nn.Module, images: str | Path, out: str | Path, cfg: EmbedConfig | None = None
) -> Embeddings:
    """Embed every image of a folder tree or of WebDataset shards into `out` (see `store`)."""
    cfg = cfg or EmbedConfig()
    if not isinstance(model, torch.nn.Module) and not Path(model).expanduser().exists():
        from lvd.pretrain.models.load import WANT

        # checked here: on the Ray path the loader's own message would arrive as an actor error
        raise FileNotFoundError(f"model {model!s} does not exist; {WANT}")
    if not isinstance(model, torch.nn.Module):
        model = str(Path(model).expanduser().resolve())  # Ray workers do not share our cwd
    units = plan_units(images, chunk=cfg.chunk)
    total = sum(u.bound for u in units)
    use_ray = cfg.ray if cfg.ray is not None else total > cfg.ray_above
    writer: FeatureWriter | None = None
    results = _on_ray(model, units, cfg) if use_ray else _in_process(model, units, cfg.features)
    for res in results:
        if writer is None:  # sizes come with the first result, so the driver loads no model
            writer = FeatureWriter(out, capacity=total, dim=res.cls_BD.shape[1], grid=res.grid)
        writer.append(res.refs, res.cls_BD, res.patches_BhwD)
        writer.skipped += res.skipped
    if writer is None:
        raise ValueError(f"{images}: no units of work")
    f = cfg.features
    # a resolved path, so `lvd search` finds the model from another working directory
    meta = {
        "model": type(model).__name__ if isinstance(model, torch.nn.Module) else model,
        "images": str(images),
        "size": f.size,
        "resize": f.resize_side,
        "patches": f.patches,
        "ray": use_ray,
        "units": len(units),
        "normalised": False,
    }
    return writer.close(meta)


def _in_process(model, units: list[Unit], cfg: FeatureConfig):
    embedder = UnitEmbedder(model, cfg)
    return (embedder(u) for u in units)


def _on_ray(model, units: list[Unit], cfg: EmbedConfig):
    """Results in unit order from `n_actors` actors, each holding one model."""
    from lvd.curation.actor_runner import actor_pool
    from lvd.curation.runner import init_ray

    init_ray()
    # the model passed by value (a path, or a small module): a restarted actor can always rebuild it
    with actor_pool(partial(UnitEmbedder, model, cfg.features), cfg.actors, len(units)) as pool:
        yield from pool.map(lambda a, u: a.apply.remote(_embed, u), units)


def _embed(embedder: UnitEmbedder, unit: Unit) -> UnitResult:
    return embedder(unit)
