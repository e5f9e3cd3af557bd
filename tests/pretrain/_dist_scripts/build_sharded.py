"""torchrun entry for tests: `parallelize` builds the tiny MetaArch on rank 0 only, meta
elsewhere, and broadcasts; every rank then gathers the full weights and rank 0 compares
them with a plain build from the same seed, writing {"equal": bool, "n": tensors} to OUT.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N build_sharded.py OUT.json
"""

import json
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lvd.pretrain.distributed import close_distributed, init_distributed
from lvd.pretrain.meta_arch import MetaArch
from lvd.pretrain.parallel import parallelize, setup_runtime
from lvd.pretrain.recipes import tiny


def main() -> None:
    rt = setup_runtime(init_distributed("cpu"))
    recipe = tiny()
    torch.manual_seed(0)
    model = parallelize(lambda: MetaArch(recipe), rt)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    assert sharded and all(not p.is_meta and p.to_local().device.type == "cpu" for p in sharded)
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rt.rank == 0:
        torch.manual_seed(0)
        want = MetaArch(recipe).state_dict()
        equal = set(want) == set(gathered) and all(torch.equal(want[k], gathered[k]) for k in want)
        with open(sys.argv[1], "w") as f:
            json.dump({"equal": equal, "n": len(want)}, f)
    close_distributed()


if __name__ == "__main__":
    main()
