"""k-NN evaluation on teacher CLS features, weighted voting as in DINO's `eval_knn.py`.

For each query, the k most cosine-similar training images vote for their class with weight
exp(similarity / T) (k=20, T=0.07 by default). Labelled folders are `DIR/<class>/*.png`
(also jpg/jpeg), classes in sorted order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LabelledFolder:
    paths: list[Path]
    labels: np.ndarray  # [N] int64, index into classes
    classes: list[str]


@dataclass(frozen=True)
class KnnResult:
    top1: float
    k: int
    temperature: float
    n_train: int
    n_val: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def list_labelled_folder(root: str | Path) -> LabelledFolder:
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images; expected {root}/<class>/*.png")
    return LabelledFolder(paths, np.asarray(labels, dtype=np.int64), classes)


def knn_predict(
    train_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    query_QD: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C] of L2-normalised queries against L2-normalised training features."""
    k = min(k, train_ND.shape[0])
    scores = []
    for q in query_QD.split(chunk):
        sim_QN = q @ train_ND.T
        top_sim_QK, top_idx_QK = sim_QN.topk(k, dim=1)
        weights_QK = (top_sim_QK / temperature).exp()
        votes_QC = torch.zeros(q.shape[0], num_classes, dtype=weights_QK.dtype)
        votes_QC.scatter_add_(1, train_labels_N[top_idx_QK], weights_QK)
        scores.append(votes_QC)
    return torch.cat(scores)


def knn_top1(
    train_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    val_ND: torch.Tensor,
    val_labels_N: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    num_classes = int(max(train_labels_N.max(), val_labels_N.max())) + 1
    train_ND, val_ND = F.normalize(train_ND.float(), dim=1), F.normalize(val_ND.float(), dim=1)
    scores = knn_predict(train_ND, train_labels_N, val_ND, num_classes=num_classes, k=k, temperature=temperature)
    return float((scores.argmax(1) == val_labels_N).float().mean())


def load_image(path: Path, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop to size x size, normalise: [3, size, size]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@torch.inference_mode()
def extract_cls(
    backbone: torch.nn.Module, paths: list[Path], *, size: int, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Backbone CLS features [N, D] (float32, on CPU) of the images at `paths`."""
    backbone.eval()
    feats = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([load_image(p, size) for p in paths[i : i + batch_size]]).to(device)
        feats.append(backbone(x).cls_BD.float().cpu())
    return torch.cat(feats)


def evaluate_knn(
    backbone: torch.nn.Module,
    train_dir: str | Path,
    val_dir: str | Path,
    *,
    size: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> KnnResult:
    train, val = list_labelled_folder(train_dir), list_labelled_folder(val_dir)
    if train.classes != val.classes:
        raise ValueError(f"class folders differ: train {train.classes} vs val {val.classes}")
    tr = extract_cls(backbone, train.paths, size=size, batch_size=batch_size, device=device)
    va = extract_cls(backbone, val.paths, size=size, batch_size=batch_size, device=device)
    top1 = knn_top1(tr, torch.from_numpy(train.labels), va, torch.from_numpy(val.labels), k=k, temperature=temperature)
    return KnnResult(top1=top1, k=k, temperature=temperature, n_train=len(train.paths), n_val=len(val.paths))
