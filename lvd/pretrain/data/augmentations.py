"""Multi-crop with DINOv2's photometric augmentations (torchvision.transforms.v2).

Gaussian blur probabilities. The DINOv2 paper (and DINO / BYOL before it) blurs the
first global crop always (p=1.0), the second with p=0.1 and local crops with p=0.5. The
official code (`dinov2/data/augmentations.py` + `transforms.py`) passes these through
`GaussianBlur(p=...)`, which hands `1 - p` to torchvision's `RandomApply`; RandomApply
applies its transform with the probability it is given, so the official pipeline
effectively blurs global crop 1 with p=0.0, global crop 2 with p=0.9 and locals with
p=0.5. We implement the probabilities the paper states (p=1.0 / 0.1 / 0.5) and pass
them to RandomApply unchanged.

Speed: colour jitter and grayscale run on the PIL crop (Pillow's C kernels beat the tensor
HSV round trip for hue), then blur and solarize run on the uint8 tensor; the blur is
torchvision's Gaussian (same kernel, reflect padding, sigma draw) applied as two 1-D
convolutions (2*9 instead of 81 multiply-adds per pixel). See benchmarks/multicrop.py.

Determinism: all v2 transforms draw from torch's global RNG, so `MultiCrop(img, seed=s)`
runs under `torch.random.fork_rng` seeded with `s`: the crops are a pure function of
(image, seed) and the caller's RNG state is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 98  # 7 patches of 14 (the paper's 96 is for patch 16)
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    global_blur_p: tuple[float, ...] = (1.0, 0.1)  # one per global crop
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)  # one per global crop
    local_blur_p: float = 0.5

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError(f"crop sizes must be positive, got {self.global_size}, {self.local_size}")
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name}={(lo, hi)}: need 0 < min <= max <= 1 (fractions of the image area)")
        for name in ("global_blur_p", "global_solarize_p"):
            if len(getattr(self, name)) != self.n_global:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries: give one per global crop ({self.n_global})"
                )
        probs = (*self.global_blur_p, *self.global_solarize_p, self.local_blur_p)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"augmentation probabilities must be in [0, 1], got {probs}")


@dataclass
class Crops:
    """One image's crops, each [3, size, size] float32, normalised."""

    global_crops: list[torch.Tensor]
    local_crops: list[torch.Tensor]


class SeparableGaussianBlur(nn.Module):
    """torchvision's GaussianBlur on a [C, H, W] tensor, computed as two 1-D convolutions."""

    def __init__(self, kernel_size: int = 9, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size}: must be odd and positive")
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, img_CHW: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma).item()  # the same draw as v2.GaussianBlur
        r = self.kernel_size // 2
        offsets = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.softmax(-(offsets**2) / (2 * sigma**2), dim=0)
        n_ch = img_CHW.shape[0]
        x = F.pad(img_CHW.float().unsqueeze(0), (r, r, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(n_ch, 1, 1, -1), groups=n_ch)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(n_ch, 1, -1, 1), groups=n_ch)[0]
        if img_CHW.is_floating_point():
            return x.to(img_CHW.dtype)
        return x.round_().clamp_(0, 255).to(img_CHW.dtype)


def _crop_transform(
    size: int, scale: tuple[float, float], cfg: MultiCropConfig, *, blur_p: float, solarize_p: float
) -> v2.Compose:
    steps: list[torch.nn.Module] = [
        # geometric on the PIL image: a bicubic resize of a crop of the full-resolution image
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.PILToTensor(),
        # kernel 9, sigma 0.1-2.0 as the official GaussianBlur; p is the probability of blurring
        v2.RandomApply([SeparableGaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # on uint8 pixels
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=cfg.mean, std=cfg.std)]
    return v2.Compose(steps)


class MultiCrop:
    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        self.global_transforms = [
            _crop_transform(cfg.global_size, cfg.global_scale, cfg, blur_p=b, solarize_p=s)
            for b, s in zip(cfg.global_blur_p, cfg.global_solarize_p)
        ]
        self.local_transform = _crop_transform(
            cfg.local_size, cfg.local_scale, cfg, blur_p=cfg.local_blur_p, solarize_p=0.0
        )

    def __call__(self, img: Image.Image, *, seed: int | None = None) -> Crops:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if seed is None:
            return self._crops(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._crops(img)

    def _crops(self, img: Image.Image) -> Crops:
        return Crops(
            global_crops=[t(img) for t in self.global_transforms],
            local_crops=[self.local_transform(img) for _ in range(self.cfg.n_local)],
        )
