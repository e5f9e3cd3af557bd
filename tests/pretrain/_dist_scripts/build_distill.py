"""torchrun entry for tests: `train._build` with `--init` weights and a frozen distillation
teacher on N ranks (rank 0 builds and fills the real model, the others a meta copy that
receives its values). Every rank compares its replicated frozen teacher with the teacher
SPEC's tensors, and the gathered student with the init SPEC's; writes OUT-rankR.json.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N build_distill.py OUT TEACHER INIT
"""

import json
import sys
from dataclasses import replace

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lvd.pretrain.distill import distilled, load_frozen_teacher
from lvd.pretrain.distributed import close_distributed, init_distributed
from lvd.pretrain.init import init_weights
from lvd.pretrain.parallel import setup_runtime
from lvd.pretrain.recipes import tiny
from lvd.pretrain.train import _build


def main() -> None:
    out, teacher, init = sys.argv[1:4]
    rt = setup_runtime(init_distributed("cpu"))
    recipe = distilled(replace(tiny(), batch_size=4), teacher)
    frozen, start = load_frozen_teacher(recipe), init_weights(init, recipe)
    torch.manual_seed(0)
    meta, _ = _build(recipe, rt, start, frozen)
    sd = meta.frozen_teacher.state_dict()
    frozen_bad = [k for k, v in frozen.tensors.items() if not torch.equal(sd[k], v)]
    student = get_model_state_dict(meta.student, options=StateDictOptions(full_state_dict=True))
    student_bad = [k for k, v in start.tensors.items() if not torch.equal(student[k], v)]
    with open(f"{out}-rank{rt.rank}.json", "w") as f:
        json.dump(
            {"frozen_bad": frozen_bad, "student_bad": student_bad, "n": [len(frozen.tensors), len(start.tensors)]}, f
        )
    close_distributed()


if __name__ == "__main__":
    main()
