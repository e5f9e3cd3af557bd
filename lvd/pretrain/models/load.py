"""`load_backbone(spec)`: one entry point for every kind of backbone weights we accept.

- a Hugging Face Dinov2 folder (has `config.json`)        -> `hf.load_hf`
- a `.pth` / `.pt` file in the official DINOv2 hub layout  -> `official.build_official`
- an lvd checkpoint dir (`step_NNNNNNN`) or a run's `--out`  -> `checkpoint.load_teacher_backbone`
The model comes back in eval mode on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lvd.pretrain.models.hf import load_hf
from lvd.pretrain.models.official import build_official, is_official_layout
from lvd.pretrain.models.vit import VisionTransformer

TORCH_SUFFIXES = (".pth", ".pt")
WANT = "pass an HF Dinov2 folder, an official DINOv2 .pth/.pt, or an lvd checkpoint dir / run --out folder"


def load_backbone(spec: str | Path) -> VisionTransformer:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"backbone {spec!s} does not exist; {WANT}")
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path).eval()
    if path.is_dir():
        # Imported here: the trainer's checkpoint module pulls in torch.distributed.checkpoint.
        from lvd.pretrain.checkpoint import load_teacher_backbone

        return load_teacher_backbone(path).eval()
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: not a backbone; {WANT}")
    state_dict = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    if not isinstance(state_dict, dict) or not is_official_layout(state_dict):
        keys = sorted(state_dict)[:8] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"{path} is not an official DINOv2 backbone state dict (first keys: {keys}); "
            "lvd checkpoints are directories: pass the step_NNNNNNN dir or the run's --out folder"
        )
    return build_official(state_dict).eval()


def _unwrap(obj):
    """Official hub files are a bare state dict; tolerate one {"model": ...} / {"state_dict": ...} level."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict) and not is_official_layout(obj):
                return obj[key]
    return obj
