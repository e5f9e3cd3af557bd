"""torchrun entry for tests: the high-resolution phase of RUN on this many ranks.

Builds the phase's model the way `train()` does (rank 0 reads RUN, FSDP2 broadcasts), writes
its gathered step-0 state (`phase-start-wN.pt`, rank 0), then trains PHASE_STEPS steps with
`train()` and writes each rank's losses.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N run_highres.py \
    RUN OUT GLOBAL_SIZE SHARD [SHARD ...]
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lvd.pretrain.distributed import close_distributed, init_distributed
from lvd.pretrain.highres import highres_overrides, start_of_run
from lvd.pretrain.overrides import resolve_recipe
from lvd.pretrain.parallel import setup_runtime
from lvd.pretrain.train import TrainConfig, _build, train

PHASE_STEPS = 2


def main() -> None:
    run, out, size, *shards = sys.argv[1:]
    out = Path(out)
    torch.set_num_threads(1)
    rt = setup_runtime(init_distributed("cpu"))
    config, sets = highres_overrides(run, None, [f"crops.global_size={size}"])
    recipe = resolve_recipe("tiny", config=config, sets=sets)
    start = start_of_run(recipe, init=None, rank=rt.rank, resuming=False, out=out)
    torch.manual_seed(123)  # not the run's seed: nothing may come from the random init
    meta, _ = _build(recipe, rt, phase=start)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(meta, options=full)  # a collective over the shards
    if rt.rank == 0:
        torch.save(
            {k: v for k, v in state.items() if k.startswith(("student.", "teacher."))},
            out / f"phase-start-w{rt.world_size}.pt",
        )
    result = train(
        TrainConfig(
            shards=tuple(shards),
            recipe=recipe,
            out=out,
            max_steps=PHASE_STEPS,
            num_workers=0,
            seed=0,
            deterministic=True,
            pictures=False,
        )
    )
    (out / f"losses-rank{rt.rank}.json").write_text(json.dumps(result.losses))
    close_distributed()


if __name__ == "__main__":
    main()
