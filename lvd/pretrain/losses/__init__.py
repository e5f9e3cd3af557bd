"""DINOv2 heads and losses: DINO (CLS), iBOT (masked patches), KoLeo, Sinkhorn-Knopp."""

from lvd.pretrain.losses.dino_head import DINOHead, Prototypes
from lvd.pretrain.losses.dino_loss import DINOLoss
from lvd.pretrain.losses.ibot_loss import iBOTPatchLoss
from lvd.pretrain.losses.koleo import KoLeoLoss
from lvd.pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOHead", "DINOLoss", "KoLeoLoss", "Prototypes", "iBOTPatchLoss", "sinkhorn_knopp"]
