"""`load_backbone(spec)`: one entry point for every kind of backbone weights we accept.

- a Hugging Face Dinov2 folder (has `config.json`)         -> `hf.load_hf`
- an official DINOv2 `.pth` / `.pt`: a hub file, or the
  teacher of an official training / eval checkpoint         -> `official.build_official`
- an lvd checkpoint dir (`step_NNNNNNN`) or a run's `--out`  -> `checkpoint.load_teacher_backbone`
  (its `teacher_backbone.safetensors` + `teacher_backbone.json` only: DCP's pickled files are
  never read here; a checkpoint of an older lvd without them is refused, naming the command
  that adds them)
Nothing here unpickles beyond `torch.load(weights_only=True)`. The model comes back in eval
mode on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lvd.pretrain.models.hf import load_hf
from lvd.pretrain.models.official import build_official, is_official_layout
from lvd.pretrain.models.vit import VisionTransformer

TORCH_SUFFIXES = (".pth", ".pt")
TEACHER_PREFIX = "teacher.backbone."
WANT = "pass an HF Dinov2 folder, an official DINOv2 .pth/.pt, or an lvd checkpoint dir / run --out folder"


def load_backbone(spec: str | Path) -> VisionTransformer:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"backbone {spec!s} does not exist; {WANT}")
    if path.is_dir() and _is_hf_folder(path):
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


def _is_hf_folder(path: Path) -> bool:
    """An HF model folder has a config.json naming a `model_type`; an lvd run's --out folder
    also has a config.json (its recipe), which names none."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _unwrap(obj):
    """Hub files are a bare backbone state dict. Official training runs wrap it: `model_*.pth`
    as {"model": {"teacher.backbone.<key>": ...}} beside the student and heads, and the eval
    `teacher_checkpoint.pth` as {"teacher": {"backbone.<key>": ...}}. We take the teacher."""
    if not isinstance(obj, dict) or is_official_layout(obj):
        return obj
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj.get(key), dict):
            obj = {("teacher." if key == "teacher" else "") + k: v for k, v in obj[key].items()}
            break
    if not any(k.startswith(TEACHER_PREFIX) for k in obj):
        return obj
    return {k[len(TEACHER_PREFIX) :]: v for k, v in obj.items() if k.startswith(TEACHER_PREFIX)}
