"""lvd: curate image dumps LVD-142M-style and pretrain DINOv2 on them."""

__version__ = "0.1.0"
