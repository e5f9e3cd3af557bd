"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

The prototype layer's weight is a plain Parameter normalised row-wise in forward, which
equals `weight_norm` with the gain fixed at 1 (DINO's `norm_last_layer=True`) and shards
cleanly with FSDP2 (no parametrization hooks). Note that DINOv2's own head fills
`weight_g` with 1 but leaves it trainable; we keep it fixed, as DINO does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Prototypes(nn.Module):
    """Linear layer without bias whose weight rows are unit vectors; `weight` [K, D]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default; scale is irrelevant

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(x_ND, F.normalize(self.weight, dim=1, eps=1e-12))


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers}: the head needs at least 1 layer (DINOv2 uses 3)")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # `last_layer`: the prototypes, frozen by the trainer during the first epoch
        self.last_layer = Prototypes(bottleneck_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise in place (also usable after FSDP2 `to_empty` on meta-device modules)."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        z_ND = self.mlp(x_ND)
        eps = 1e-6 if z_ND.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(z_ND, p=2, dim=-1, eps=eps))
