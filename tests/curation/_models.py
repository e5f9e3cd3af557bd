"""A small copy model in the SSCD file format (TorchScript), shared by the copy-detection tests."""

from __future__ import annotations

import torch


class TinyDescriptor(torch.nn.Module):
    """A strided conv, pooled to 4 x 4: 128-d descriptors (random weights: seed before making it)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
