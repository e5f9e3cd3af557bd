"""torchrun entry for the elastic-resume tests: train, or restore on this world size and go on.

RESUME=0: `train()` the test recipe for STEPS steps (fresh), then restore its last checkpoint
on the same ranks. RESUME=1: restore the last checkpoint on this world size, then `train()`
with --resume up to STEPS. Either way, right after the restore rank 0 writes what the ranks
hold, gathered (`restored-wN.pt`: student, teacher, loss centres, AdamW state), every rank
its next torch draws (`rng-wN-rankR.json`), and rank 0 the DINO / iBOT losses of the restored
model and of a freshly built one on one fixed global batch split over the ranks
(`probe-wN.json`; equal on any world size up to float summation order).

Usage: python -m torch.distributed.run --standalone --nproc-per-node N run_elastic.py \
    OUT STEPS RESUME(0|1) SHARD [SHARD ...]
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from lvd.datasets import load_fashion_mnist
from lvd.pretrain import checkpoint as ckpt
from lvd.pretrain.data import MaskingConfig, MultiCrop, MultiCropConfig, collate
from lvd.pretrain.distributed import all_ranks_mean, close_distributed, init_distributed
from lvd.pretrain.parallel import full_tensor, setup_runtime
from lvd.pretrain.schedules import build_schedules
from lvd.pretrain.train import TrainConfig, _build, _restore, train

HERE = Path(__file__).parent
PROBE_IMAGES = 8


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(tree, prefix=""):
    """Nested state dicts to {"a.b.c": full tensor} (a collective for DTensors)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = full_tensor(value).detach().cpu().clone()
    return out


def _probe_batch(recipe, rt):
    """One fixed global batch of PROBE_IMAGES test images; this rank's contiguous slice."""
    c, m = recipe.crops, recipe.masks
    crops = MultiCrop(
        MultiCropConfig(
            global_size=c.global_size,
            local_size=c.local_size,
            n_local=c.n_local,
            global_scale=c.global_scale,
            local_scale=c.local_scale,
        )
    )
    images, _ = load_fashion_mnist("test")
    samples = [crops(Image.fromarray(images[1000 + i]), seed=i) for i in range(PROBE_IMAGES)]
    masking = MaskingConfig(
        sample_probability=m.sample_probability,
        ratio_min=m.ratio_min,
        ratio_max=m.ratio_max,
        patch_size=recipe.backbone.patch_size,
    )
    batch = collate(samples, masking, np.random.default_rng(0))
    return _module("equal_batch").rank_slice(batch, rt.rank, rt.world_size)


@torch.no_grad()
def _probe(meta, recipe, rt, step):
    temp = build_schedules(recipe.schedule_config(world_size=rt.world_size)).at(step).teacher_temp
    losses = meta.step(_probe_batch(recipe, rt), teacher_temp=temp).losses.as_floats()
    return {k: all_ranks_mean(losses[k], rt.device) for k in ("dino_loss", "ibot_loss")}


def dump_restored(out: Path, recipe, rt) -> int:
    last = ckpt.latest_checkpoint(out)
    torch.manual_seed(0)
    fresh, _ = _build(recipe, rt)
    torch.manual_seed(0)
    meta, optimizer = _build(recipe, rt)
    torch.manual_seed(0 + rt.rank)  # what train() does before restoring
    info = _restore(meta, optimizer, last)
    draws = torch.rand(4).tolist()  # this rank's generator right after the restore
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(meta.student, optimizer, options=full)
    state = {f"student.{k}": v for k, v in model_sd.items()}
    for part in ("teacher", "dino_loss", "ibot_loss"):
        state |= _flat(getattr(meta, part).state_dict(), f"{part}.")
    state |= _flat(optim_sd.get("state", {}), "optimizer.")
    meta.train(), fresh.train()
    probe = {"restored": _probe(meta, recipe, rt, info.step), "fresh": _probe(fresh, recipe, rt, info.step)}
    w = rt.world_size
    (out / f"rng-w{w}-rank{rt.rank}.json").write_text(json.dumps({"draws": draws, "step": info.step}))
    if rt.rank == 0:
        torch.save(state, out / f"restored-w{w}.pt")
        (out / f"probe-w{w}.json").write_text(json.dumps(probe))
    return info.step


def main() -> None:
    out, steps, resume, *shards = sys.argv[1:]
    out = Path(out)
    torch.set_num_threads(1)
    recipe = _module("run_train").test_recipe()
    rt = setup_runtime(init_distributed("cpu"))
    torch.use_deterministic_algorithms(True)
    if resume == "1":
        dump_restored(out, recipe, rt)
    result = train(
        TrainConfig(
            shards=tuple(shards),
            recipe=recipe,
            out=out,
            max_steps=int(steps),
            resume=resume == "1",
            num_workers=0,
            seed=0,
            deterministic=True,
            pictures=False,
        )
    )
    (out / f"losses-rank{rt.rank}-from{result.start_step}.json").write_text(json.dumps(result.losses))
    if resume == "0":
        dump_restored(out, recipe, rt)
    close_distributed()


if __name__ == "__main__":
    main()
