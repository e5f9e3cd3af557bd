"""Pretraining data: multi-crop augmentations, iBOT masks, typed batches, shard reader."""

from lvd.pretrain.data.augmentations import Crops, MultiCrop, MultiCropConfig
from lvd.pretrain.data.collate import Batch, collate
from lvd.pretrain.data.masking import BlockMaskGenerator, MaskingConfig
from lvd.pretrain.data.plan import DataPlan, fresh_plan
from lvd.pretrain.data.shard_stream import expand_shards
from lvd.pretrain.data.shards import ShardDataConfig, loader_from_config, make_dataloader

__all__ = [
    "Batch",
    "BlockMaskGenerator",
    "Crops",
    "DataPlan",
    "MaskingConfig",
    "MultiCrop",
    "MultiCropConfig",
    "ShardDataConfig",
    "collate",
    "expand_shards",
    "fresh_plan",
    "loader_from_config",
    "make_dataloader",
]
