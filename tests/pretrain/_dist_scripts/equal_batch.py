"""torchrun entry for tests: train a few steps on fixed global batches split by rank.

Every rank builds the same global batch (multi-crop with a seed per image, masks from a seed
per step) and keeps its contiguous slice of images, so N ranks see together exactly what
one process sees. Rank 0 writes, per step, the mean over ranks of each loss term, and then the gradient
norms per student module of one more step.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N equal_batch.py OUT.json
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvd.datasets import load_fashion_mnist
from lvd.pretrain.data import MaskingConfig, MultiCrop, MultiCropConfig, collate
from lvd.pretrain.distributed import all_ranks_mean, close_distributed, init_distributed
from lvd.pretrain.optim import clip_gradients
from lvd.pretrain.parallel import setup_runtime
from lvd.pretrain.recipes import tiny
from lvd.pretrain.schedules import build_schedules
from lvd.pretrain.train import _build, _train_step

GLOBAL_BATCH, STEPS = 8, 4


def rank_slice(batch, rank: int, world: int):
    """This rank's contiguous images of a crop-major global batch, masks re-indexed."""
    b = batch.n_images // world
    keep = slice(rank * b, (rank + 1) * b)

    def part(x, n_crops):
        return x.unflatten(0, (n_crops, batch.n_images))[:, keep].flatten(0, 1)

    masks = part(batch.masks, batch.n_global)
    per_crop = masks.sum(1, keepdim=True).clamp(min=1).float()
    return replace(
        batch,
        global_crops=part(batch.global_crops, batch.n_global),
        local_crops=part(batch.local_crops, batch.n_local),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / per_crop).expand_as(masks)[masks],
        n_images=b,
    )


def main() -> None:
    torch.set_num_threads(1)
    rt = setup_runtime(init_distributed("cpu"))
    torch.use_deterministic_algorithms(True)
    r = tiny()
    # KoLeo is per rank by design (see parallel.py), so it is off here: with it on, the
    # trajectories would differ after the first update and only step 0 would compare.
    recipe = replace(
        r, batch_size=GLOBAL_BATCH // rt.world_size, epochs=4, epoch_length=2, loss=replace(r.loss, koleo_weight=0.0)
    )
    torch.manual_seed(0)
    meta, optimizer = _build(recipe, rt)
    meta.train()
    schedules = build_schedules(recipe.schedule_config(world_size=rt.world_size))
    c = recipe.crops
    crops = MultiCrop(
        MultiCropConfig(
            global_size=c.global_size,
            local_size=c.local_size,
            n_local=c.n_local,
            global_scale=c.global_scale,
            local_scale=c.local_scale,
        )
    )
    m = recipe.masks
    masking = MaskingConfig(
        sample_probability=m.sample_probability,
        ratio_min=m.ratio_min,
        ratio_max=m.ratio_max,
        patch_size=recipe.backbone.patch_size,
    )
    images, _ = load_fashion_mnist("test")
    rows = []
    for step in range(STEPS):
        samples = [
            crops(Image.fromarray(images[step * GLOBAL_BATCH + i]), seed=1000 * step + i) for i in range(GLOBAL_BATCH)
        ]
        batch = collate(samples, masking, np.random.default_rng(step))
        batch = rank_slice(batch, rt.rank, rt.world_size)
        out = _train_step(meta, optimizer, batch, schedules.at(step), step, rt)
        rows.append({k: all_ranks_mean(v, rt.device) for k, v in out.losses.as_floats().items()})
    # One more backward: the gradient norms clip_gradients sees (global over DTensor shards)
    optimizer.zero_grad(set_to_none=True)
    meta.step(batch, teacher_temp=schedules.at(STEPS).teacher_temp).losses.total.backward()
    norms = clip_gradients(dict(meta.student.items()), float("inf"))
    if rt.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"losses": rows, "grad_norms": norms}))
    close_distributed()


if __name__ == "__main__":
    main()
