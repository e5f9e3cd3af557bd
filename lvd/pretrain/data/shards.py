"""Endless, deterministic, resumable reader of curation's WebDataset shards.

Layout (docs/architecture.md): `shard-NNNNNN.tar` holding `KEY.jpg` + `KEY.json` (`uid`, ...).

Stream. The run's data is V streams (`plan.py`; each one reader slot of `shard_stream`:
per-epoch seeded shard order, disjoint shards per stream, interleaved groups of shards
through a seeded shuffle buffer). Each rank's DataLoader workers own some of the rank's
streams and take one sample from each in turn; a worker turns every `batch_size` raw samples
into one Batch, so batch k of a rank is made by logical worker k % W. The stream is a pure
function of (shards, seed, data plan, shuffle settings); the plan's stream positions are
what makes a resume on another number of ranks continue every stream where it stopped.

Augmentation and masks. Crops of image i of batch k on rank r are drawn with seed
(seed, r, k, i); masks with (seed, r, k). So a resumed stream reproduces crops exactly.

Resume. `start_batch=k` makes worker w play logical worker (w + k - plan.step) % W
(DataLoader polls workers round robin from 0) and skip, in each of its streams, the samples
the plan says were taken, without decoding them: whole shard groups are passed using counts
from the tar headers; only the group holding the resume point is re-read (not decoded).

Corrupt samples (bad JPEG, bad JSON, missing member) are replaced by another sample of
the same batch, re-augmented with their own seed, so every batch has `batch_size` images
and resume arithmetic stays exact; `Batch.n_corrupt` counts them for the trainer to log.
(A batch whose samples are all corrupt is skipped whole; resume is then no longer exact.)
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lvd.pretrain.data.augmentations import Crops, MultiCrop, MultiCropConfig
from lvd.pretrain.data.collate import Batch, collate
from lvd.pretrain.data.masking import MaskingConfig
from lvd.pretrain.data.plan import DataPlan, fresh_plan
from lvd.pretrain.data.shard_stream import RawSample, SlotSpec, expand_shards, raw_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ShardDataConfig:
    batch_size: int  # images per rank per step
    num_workers: int = 4
    seed: int = 0
    shuffle_buffer: int = 1000  # raw samples; 0 or 1: no shuffling beyond the shard order
    shuffle_shards: int = 4  # shards read interleaved and shuffled together
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    pin_memory: bool = True
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: need at least 1 image per rank")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: use a non-negative seed")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers and shuffle_buffer must be >= 0")
        if self.shuffle_shards < 1:
            raise ValueError(f"shuffle_shards={self.shuffle_shards}: mix at least 1 shard at a time")
        if self.crops.global_size % self.masking.patch_size:
            raise ValueError(
                f"global crop size {self.crops.global_size} is not a multiple of patch_size "
                f"{self.masking.patch_size}: the iBOT mask grid would not match the ViT's patches"
            )


@dataclass
class DecodedSample:
    uid: str
    image: Image.Image


def decode(raw: RawSample) -> DecodedSample:
    """Parse KEY.json and decode KEY.jpg; raises on any defect."""
    meta = json.loads(raw.files["json"])
    with Image.open(io.BytesIO(raw.files["jpg"])) as img:
        img.load()
        image = ImageOps.exif_transpose(img).convert("RGB")
    return DecodedSample(uid=str(meta.get("uid", raw.key)), image=image)


def sample_seed(seed: int, rank: int, batch_index: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, rank, batch_index, i]).generate_state(1, np.uint64)[0] >> 1)


class ShardStream(IterableDataset):
    """Yields ready `Batch`es of one rank; use with DataLoader(batch_size=None)."""

    def __init__(self, shards: list[str], cfg: ShardDataConfig, *, rank: int, plan: DataPlan, start_batch: int) -> None:
        super().__init__()
        self.shards, self.cfg, self.plan = shards, cfg, plan
        self.rank, self.start_batch = rank, start_batch
        self.multicrop = MultiCrop(cfg.crops)

    def _raw_samples(self, logical: int) -> Iterator[RawSample]:
        """The logical worker's streams from `start_batch` on, one sample of each in turn."""
        start = self.plan.worker_start(self.rank, logical, self.start_batch)
        streams = [
            raw_stream(
                self.shards,
                SlotSpec(
                    seed=self.cfg.seed,
                    slot=v,
                    n_slots=self.plan.streams,
                    buffer=self.cfg.shuffle_buffer,
                    group=self.cfg.shuffle_shards,
                ),
                skip=skip,
            )
            for v, skip in zip(start.streams, start.skips)
        ]
        for t in itertools.count(start.turn):
            yield next(streams[t % len(streams)])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)  # one core per worker; parallelism comes from workers
        logical = (worker + self.start_batch - self.plan.step) % n_workers
        first_batch = self.start_batch + worker  # the first global batch index this worker owns
        stream = self._raw_samples(logical)
        batch_index = first_batch
        while True:
            raws = [next(stream) for _ in range(self.cfg.batch_size)]
            batch = self._make_batch(raws, batch_index)
            if batch is not None:
                yield batch
            batch_index += n_workers

    def _make_batch(self, raws: list[RawSample], batch_index: int) -> Batch | None:
        decoded: list[DecodedSample | None] = []
        for raw in raws:
            try:
                decoded.append(decode(raw))
            except Exception as exn:  # any defect of one sample must not stop training
                log.warning("corrupt sample %s in %s: %r", raw.key, raw.shard, exn)
                decoded.append(None)
        good = [i for i, d in enumerate(decoded) if d is not None]
        if not good:
            log.warning("batch %d: all %d samples corrupt; skipped", batch_index, len(raws))
            return None
        crops: list[Crops] = []
        uids: list[str] = []
        for i, d in enumerate(decoded):
            # a corrupt slot takes the next good sample of the batch, with its own seed
            source = d if d is not None else decoded[min(good, key=lambda g: (g - i) % len(raws))]
            crops.append(self.multicrop(source.image, seed=sample_seed(self.cfg.seed, self.rank, batch_index, i)))
            uids.append(source.uid)
        mask_rng = np.random.default_rng([self.cfg.seed, self.rank, batch_index, 1 << 20])
        n_corrupt = len(raws) - len(good)
        return collate(
            crops, self.cfg.masking, mask_rng, uids=tuple(uids), n_corrupt=n_corrupt, batch_index=batch_index
        )


def make_dataloader(
    shards: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    seed: int = 0,
    crops: MultiCropConfig | None = None,
    masking: MaskingConfig | None = None,
    start_batch: int = 0,
    plan: DataPlan | None = None,
    **options,  # other ShardDataConfig fields: shuffle_buffer, shuffle_shards, pin_memory, ...
) -> DataLoader:
    """Endless DataLoader of `Batch` for one rank; its first batch is batch `start_batch`
    of the uninterrupted stream."""
    cfg = ShardDataConfig(
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        crops=crops or MultiCropConfig(),
        masking=masking or MaskingConfig(),
        **options,
    )
    return loader_from_config(shards, cfg, rank=rank, world_size=world_size, start_batch=start_batch, plan=plan)


def loader_from_config(
    shards: Sequence[str | os.PathLike] | str | os.PathLike,
    cfg: ShardDataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    plan: DataPlan | None = None,
) -> DataLoader:
    """The DataLoader of one rank from `start_batch` on. `plan`: the run's data plan (see
    plan.py; a checkpoint's, to resume), remapped to this layout; default a new run's."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch}: must be >= 0")
    paths = expand_shards(shards)
    if plan is None:
        plan = fresh_plan(
            n_shards=len(paths), world_size=world_size, workers=cfg.num_workers, batch_size=cfg.batch_size
        )
    plan = plan.resumed(start_batch, world_size=world_size, workers=cfg.num_workers, batch_size=cfg.batch_size)
    dataset = ShardStream(paths, cfg, rank=rank, plan=plan, start_batch=start_batch)
    workers = plan.n_workers(rank) if cfg.num_workers > 0 else 0
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
    )
