"""torchrun entry for tests: `train()` on the test recipe; each rank writes its losses.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N run_train.py \
    OUT MAX_STEPS RESUME(0|1) SHARD [SHARD ...]
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lvd.pretrain.distributed import close_distributed
from lvd.pretrain.recipes import tiny
from lvd.pretrain.train import TrainConfig, train


def test_recipe():
    return replace(tiny(), batch_size=4, epochs=4, epoch_length=2, log_every=1, checkpoint_every=2, keep_checkpoints=2)


def main() -> None:
    out, max_steps, resume, *shards = sys.argv[1:]
    torch.set_num_threads(1)
    recipe = test_recipe()
    result = train(
        TrainConfig(
            shards=tuple(shards),
            recipe=recipe,
            out=Path(out),
            max_steps=int(max_steps),
            resume=resume == "1",
            num_workers=0,
            seed=0,
            deterministic=True,
            pictures=True,
        )
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (Path(out) / f"losses-rank{rank}-from{result.start_step}.json").write_text(json.dumps(result.losses))
    close_distributed()


if __name__ == "__main__":
    main()
