"""Dense linear (or small MLP) probe on frozen patch features: depth or disparity per pixel.

Data: a folder with `images/NAME.{png,jpg,jpeg,...}` and `targets/NAME.npy` (float H x W) or
`targets/NAME.png` (16-bit; value / `png_scale`). A target pixel is valid when it is finite and
> 0 (0 is "no measurement" in 16-bit depth PNGs; inf marks occlusions in Middlebury disparity).
The target may have another resolution than its image: both cover the same field of view.

Training: each image's patch features (`features.patch_features`, whole image, shorter side
`size`) are regressed on the mean valid target under each patch (cells of at least
`min_valid` valid fraction), features and target standardised with training statistics, MSE,
full-batch AdamW. Evaluation: the patch-grid prediction is bilinearly upsampled to the target's
resolution and scored on every valid pixel of every image together: RMSE and, for depth,
delta1 = share of pixels with max(pred/gt, gt/pred) < 1.25. The same metrics for the constant
prediction "mean of the training pixels" are the baseline a probe must beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lvd.tools.features import check_size, patch_features
from lvd.tools.images import open_checked_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TARGET_KINDS = ("depth", "disparity")
HEADS = ("linear", "mlp")
DELTA = 1.25


@dataclass(frozen=True, kw_only=True)
class DenseProbeConfig:
    target: str = "depth"  # depth | disparity (delta1 is reported for depth only)
    head: str = "linear"  # linear | mlp (one hidden layer of `hidden` units)
    hidden: int = 256
    size: int = 224  # shorter image side fed to the backbone; a multiple of the patch size
    steps: int = 300  # full-batch AdamW steps
    lr: float = 1e-2
    weight_decay: float = 1e-3
    min_valid: float = 0.5  # a patch is trained on when this share of its target pixels is valid
    png_scale: float = 1.0  # 16-bit target PNG value / png_scale = depth or disparity
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGET_KINDS:
            raise ValueError(f"target={self.target!r}: choose one of {TARGET_KINDS}")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}: choose one of {HEADS}")
        if self.steps < 1 or self.lr <= 0 or self.hidden < 1:
            raise ValueError(f"steps={self.steps}, lr={self.lr}, hidden={self.hidden}: all must be positive")
        if not 0.0 < self.min_valid <= 1.0:
            raise ValueError(f"min_valid={self.min_valid}: use a share in (0, 1]")
        if self.png_scale <= 0:
            raise ValueError(f"png_scale={self.png_scale}: use a positive divisor (e.g. 256 for KITTI depth)")


@dataclass(frozen=True)
class DenseSample:
    name: str
    image: Image.Image
    target_HW: np.ndarray  # float32; NaN where invalid


@dataclass(frozen=True)
class DenseMetrics:
    """Scores over all valid pixels of a folder: the probe's and the mean predictor's."""

    pixels: int
    rmse: float
    mean_rmse: float  # predicting the training mean everywhere
    delta1: float | None  # depth only
    mean_delta1: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DenseProbe:
    """A trained head and the statistics it standardises with."""

    head: nn.Module
    feat_mean_D: torch.Tensor
    feat_std_D: torch.Tensor
    target_mean: float  # of the training patch targets (un-standardises the head's output)
    target_std: float
    baseline: float  # mean of the valid training pixels: the mean predictor's constant

    @torch.no_grad()
    def predict(self, patches_hwD: np.ndarray) -> torch.Tensor:
        """[h, w] prediction in target units."""
        x_hwD = (torch.from_numpy(patches_hwD) - self.feat_mean_D) / self.feat_std_D
        return self.head(x_hwD)[..., 0] * self.target_std + self.target_mean


def read_target(path: Path, png_scale: float) -> np.ndarray:
    """float32 [H, W] with NaN where the value is not finite or not > 0."""
    if path.suffix == ".npy":
        values = np.load(path).astype(np.float32)
    else:
        values = np.asarray(open_checked_file(path)).astype(np.float32) / png_scale
    if values.ndim != 2:
        raise ValueError(f"{path}: target has shape {values.shape}; store one H x W map per image")
    return np.where(np.isfinite(values) & (values > 0), values, np.nan).astype(np.float32)


def read_dense_folder(root: str | Path, png_scale: float = 1.0) -> list[DenseSample]:
    """Samples of `root/images` with their `root/targets` maps, sorted by name."""
    root = Path(root)
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(
            f"{root}/images holds no image: lay out DIR/images/NAME.png and DIR/targets/NAME.npy (or a 16-bit NAME.png)"
        )
    samples = []
    for image_path in images:
        found = [
            p
            for p in (root / "targets" / f"{image_path.stem}.npy", root / "targets" / f"{image_path.stem}.png")
            if p.is_file()
        ]
        if not found:
            raise FileNotFoundError(
                f"no target for {image_path.name}: add {root}/targets/{image_path.stem}.npy or .png"
            )
        image = open_checked_file(image_path).convert("RGB")
        samples.append(DenseSample(image_path.stem, image, read_target(found[0], png_scale)))
    return samples


def patch_targets(target_HW: np.ndarray, h: int, w: int, min_valid: float) -> np.ndarray:
    """float32 [h, w]: mean valid target under each patch; NaN where under `min_valid` valid."""
    valid_11HW = torch.from_numpy(np.isfinite(target_HW).astype(np.float32))[None, None]
    filled_11HW = torch.from_numpy(np.nan_to_num(target_HW, nan=0.0))[None, None]
    share_hw = F.adaptive_avg_pool2d(valid_11HW, (h, w))[0, 0]
    total_hw = F.adaptive_avg_pool2d(filled_11HW, (h, w))[0, 0]
    mean_hw = total_hw / share_hw.clamp_min(1e-8)
    return torch.where(share_hw >= min_valid, mean_hw, torch.nan).numpy()


def _make_head(dim: int, cfg: DenseProbeConfig) -> nn.Module:
    if cfg.head == "linear":
        return nn.Linear(dim, 1)
    return nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))


def _features(backbone: nn.Module, samples: list[DenseSample], size: int) -> list[np.ndarray]:
    return [patch_features(backbone, s.image, size)[1] for s in samples]


def _fit(x_PD: torch.Tensor, y_P: torch.Tensor, baseline: float, cfg: DenseProbeConfig) -> DenseProbe:
    torch.manual_seed(cfg.seed)
    feat_mean, feat_std = x_PD.mean(0), x_PD.std(0).clamp_min(1e-6)
    y_mean, y_std = float(y_P.mean()), max(float(y_P.std()), 1e-6)
    x_PD, y_P = (x_PD - feat_mean) / feat_std, (y_P - y_mean) / y_std
    head = _make_head(x_PD.shape[1], cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        loss = F.mse_loss(head(x_PD)[:, 0], y_P)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return DenseProbe(head.eval(), feat_mean, feat_std, y_mean, y_std, baseline)


def train_dense_probe(backbone: nn.Module, train: list[DenseSample], cfg: DenseProbeConfig) -> DenseProbe:
    """Fit the head on every training patch with a valid target. The baseline's mean is the
    mean over valid training pixels, not patches."""
    check_size(backbone, cfg.size)
    xs, ys = [], []
    for sample, patches_hwD in zip(train, _features(backbone, train, cfg.size)):
        y_hw = patch_targets(sample.target_HW, *patches_hwD.shape[:2], cfg.min_valid)
        keep_hw = np.isfinite(y_hw)
        xs.append(patches_hwD[keep_hw])
        ys.append(y_hw[keep_hw])
    if not sum(len(y) for y in ys):
        raise ValueError(f"no training patch has >= {cfg.min_valid:.0%} valid target pixels")
    pixels = np.concatenate([s.target_HW[np.isfinite(s.target_HW)] for s in train])
    return _fit(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), float(pixels.mean()), cfg)


def evaluate_dense_probe(
    backbone: nn.Module, probe: DenseProbe, samples: list[DenseSample], cfg: DenseProbeConfig
) -> DenseMetrics:
    """Probe and mean-predictor scores over every valid pixel of `samples` (at the targets'
    resolution: predictions are upsampled bilinearly from the patch grid)."""
    preds, truths = [], []
    for sample, patches_hwD in zip(samples, _features(backbone, samples, cfg.size)):
        pred_11hw = probe.predict(patches_hwD)[None, None]
        pred_HW = F.interpolate(pred_11hw, size=sample.target_HW.shape, mode="bilinear", align_corners=False)[
            0, 0
        ].numpy()
        valid_HW = np.isfinite(sample.target_HW)
        preds.append(pred_HW[valid_HW])
        truths.append(sample.target_HW[valid_HW])
    return dense_metrics(np.concatenate(preds), np.concatenate(truths), probe.baseline, cfg.target)


def dense_metrics(pred_P: np.ndarray, truth_P: np.ndarray, baseline: float, target: str) -> DenseMetrics:
    if not len(truth_P):
        raise ValueError("no valid target pixel to evaluate on")
    mean_P = np.full_like(truth_P, baseline)
    with_delta = target == "depth"
    return DenseMetrics(
        pixels=len(truth_P),
        rmse=rmse(pred_P, truth_P),
        mean_rmse=rmse(mean_P, truth_P),
        delta1=delta1(pred_P, truth_P) if with_delta else None,
        mean_delta1=delta1(mean_P, truth_P) if with_delta else None,
    )


def rmse(pred_P: np.ndarray, truth_P: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred_P.astype(np.float64) - truth_P) ** 2)))


def delta1(pred_P: np.ndarray, truth_P: np.ndarray) -> float:
    """Share of pixels with max(pred/gt, gt/pred) < 1.25; predictions <= 0 count as misses."""
    pred_P = pred_P.astype(np.float64)
    ratio_P = np.maximum(pred_P / truth_P, truth_P / np.where(pred_P > 0, pred_P, np.nan))
    return float(np.mean(np.nan_to_num(ratio_P, nan=np.inf) < DELTA))
