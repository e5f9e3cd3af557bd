"""Shared fixtures for lvd.tools tests: one tiny backbone saved in the three real formats, and
real photos shipped by scikit-image / scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

NATIVE = 56  # the tiny recipe's global crop: the position-embedding grid is 4 x 4 patches


@dataclass(frozen=True)
class TinyBackbone:
    """A random ViT-Ti/14 with 4 registers (the `tiny` recipe), the same weights three ways."""

    model: torch.nn.Module  # eval mode, CPU
    lvd: Path  # an lvd run --out folder (checkpoint step_0000001 inside)
    official: Path  # an official-layout DINOv2 .pth (bare backbone state dict)
    hf: Path  # a Hugging Face Dinov2WithRegisters folder
    native: int = NATIVE


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> TinyBackbone:
    from lvd.pretrain.checkpoint import CheckpointMeta, save_checkpoint
    from lvd.pretrain.models.hf import export_hf
    from lvd.pretrain.recipes import tiny

    root = tmp_path_factory.mktemp("tiny-backbone")
    recipe = tiny()
    recipe = replace(recipe, crops=replace(recipe.crops, global_size=NATIVE))
    torch.manual_seed(0)
    model = recipe.backbone.build(img_size=NATIVE).eval()
    sd = model.state_dict()
    meta = CheckpointMeta(step=1, data_batches=0, world_size=1, recipe=recipe.to_dict())
    save_checkpoint(root / "run", {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, meta, keep=1)
    torch.save(sd, root / "dinov2_vitt14_reg4_pretrain.pth")
    export_hf(model, root / "hf")
    return TinyBackbone(model, root / "run", root / "dinov2_vitt14_reg4_pretrain.pth", root / "hf")


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of 8 real photos, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
    out = [(n, Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in names]
    sample = load_sample_images()
    out += [(Path(f).stem, Image.fromarray(a)) for f, a in zip(sample.filenames, sample.images)]
    return out
