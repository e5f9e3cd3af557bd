"""NSFW filter: a classifier the user brings, scored at ingest; there is no default model.

No NSFW model ships in a registry package and none is downloaded, so without `--nsfw-model`
the stage is off and the run summary says "nsfw filter: off (no model)"; it never pretends
to filter. Interface of the model file (`NsfwConfig.model`):
- TorchScript (`.pt`, `.pth`, `.ts`, `.torchscript`): `torch.jit.load`-able, called on a float32
  batch N x 3 x S x S (RGB in [0, 1], the image squashed to S = `input_size`, no normalisation:
  put any in the model), returning N logits (shape N or N x 1) that the image is NSFW;
- ONNX (`.onnx`): the same contract, run with OpenCV's DNN module (no onnxruntime needed).
A linear head on embedder features (as NeMo Curator and LAION do) is such a model too: script
the backbone and head together. The score is sigmoid(logit); an image scoring at or above
`threshold` is rejected with reason `nsfw` and its score in the ledger's detail.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
OFF = "nsfw filter: off (no model)"


@dataclass(frozen=True, kw_only=True)
class NsfwConfig:
    model: str
    threshold: float = 0.5
    input_size: int = 224
    model_sha256: str = ""  # content hash (set from the file: a changed model re-runs ingest)

    def __post_init__(self) -> None:
        if not os.path.isfile(self.model):
            raise ValueError(f"nsfw model {self.model!r}: no such file (TorchScript or ONNX)")
        if not self.model.lower().endswith((*TORCHSCRIPT_SUFFIXES, ".onnx")):
            raise ValueError(
                f"nsfw model {self.model!r}: use a TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)}) or an .onnx file"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"nsfw threshold {self.threshold}: use a probability in (0, 1)")
        if self.input_size < 16:
            raise ValueError(f"nsfw input_size {self.input_size}: use at least 16")
        if not self.model_sha256:
            with open(self.model, "rb") as f:
                object.__setattr__(self, "model_sha256", hashlib.sha256(f.read()).hexdigest())

    def summary(self) -> str:
        return f"nsfw filter: on ({os.path.basename(self.model)}, threshold {self.threshold:g})"


def summary(cfg: NsfwConfig | None) -> str:
    return cfg.summary() if cfg is not None else OFF


@functools.lru_cache(maxsize=2)
def _load(path: str, sha: str):
    """The model, once per process and file content."""
    if path.lower().endswith(".onnx"):
        import cv2

        return cv2.dnn.readNetFromONNX(path)
    import torch

    model = torch.jit.load(path, map_location="cpu")
    model.eval()
    return model


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """1 x 3 x size x size float32 RGB in [0, 1] (the interface in the module doc)."""
    x = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def score(img: Image.Image, cfg: NsfwConfig) -> float:
    """sigmoid of the model's logit for one oriented RGB-convertible image."""
    x = model_input(img, cfg.input_size)
    model = _load(cfg.model, cfg.model_sha256)
    if cfg.model.lower().endswith(".onnx"):
        model.setInput(x)
        logit = float(np.asarray(model.forward()).reshape(-1)[0])
    else:
        import torch

        with torch.inference_mode():
            logit = float(model(torch.from_numpy(x)).reshape(-1)[0])
    return float(1.0 / (1.0 + np.exp(-logit)))
