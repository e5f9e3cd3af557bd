"""infra/slurm/pretrain.sbatch: its #SBATCH header is one sbatch reads, the script is valid
bash, and its torchrun and `lvd pretrain` command lines parse with torchrun's and lvd's own
argument parsers. No Slurm here: nothing is submitted."""

from __future__ import annotations

import re
import shlex
import subprocess

from .test_configs import ROOT, image_refs, parse_lvd

SBATCH = ROOT / "infra" / "slurm" / "pretrain.sbatch"
# the sbatch long options the script uses (from `man sbatch`); a typo is not among them
SBATCH_OPTIONS = {
    "--job-name",
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--cpus-per-task",
    "--mem",
    "--time",
    "--requeue",
    "--output",
    "--partition",
    "--account",
}


def header_and_body() -> tuple[list[str], list[str]]:
    """sbatch reads #SBATCH lines only up to the first line that is neither a comment nor
    blank; what follows is the script."""
    lines = SBATCH.read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    return lines[:first], lines[first:]


def directives() -> dict[str, str | None]:
    header, _ = header_and_body()
    out = {}
    for line in header:
        if line.startswith("#SBATCH "):  # `##SBATCH` is a switched-off directive
            key, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            out[key] = value or None
    return out


def commands() -> list[str]:
    """The script's lines with `\\` continuations joined and comments dropped."""
    _, body = header_and_body()
    joined, buf = [], ""
    for line in body:
        if not buf and line.lstrip().startswith("#"):
            continue
        buf += line.strip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        joined.append(buf)
        buf = ""
    return joined


def test_header_is_read_by_sbatch_and_asks_for_gpu_nodes():
    header, body = header_and_body()
    assert header[0] == "#!/bin/bash"
    late = [ln for ln in body if ln.startswith("#SBATCH")]
    assert not late, f"sbatch ignores directives after the first command: {late}"
    opts = directives()
    assert set(opts) <= SBATCH_OPTIONS, f"not sbatch options: {set(opts) - SBATCH_OPTIONS}"
    assert int(opts["--nodes"]) >= 2 and int(opts["--gpus-per-node"]) >= 1
    assert opts["--ntasks-per-node"] == "1"  # one torchrun per node starts the ranks
    assert re.fullmatch(r"\d+:\d\d:\d\d", opts["--time"])
    assert "--requeue" in opts  # with --resume below, a requeued job continues


def test_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_torchrun_and_lvd_command_lines_parse():
    from torch.distributed.run import get_args_parser

    (line,) = [c for c in commands() if c.startswith("srun ")]
    argv = shlex.split(line)
    srun_args, torchrun_args = argv[: argv.index("torchrun")], argv[argv.index("torchrun") + 1 :]
    assert "--kill-on-bad-exit=1" in srun_args and "--ntasks-per-node=1" in srun_args
    run = get_args_parser().parse_args(torchrun_args)  # torchrun's own parser
    assert run.rdzv_backend == "c10d" and run.rdzv_endpoint == "$head:$RDZV_PORT"
    assert run.nnodes == "$SLURM_NNODES" and run.nproc_per_node == "$GPUS_PER_NODE"
    assert run.rdzv_id == "$SLURM_JOB_ID"  # the same on every node of the job, new per job
    assert run.module and run.training_script == "lvd.cli"
    args = parse_lvd(shlex.join(["lvd", *run.training_script_args]))
    assert args.command == "pretrain" and args.resume
    assert (args.shards, str(args.out), args.recipe) == (["$SHARDS"], "$OUT", "$RECIPE")
    # torchrun starts the ranks: lvd's own launchers stay off inside it
    assert (args.nproc_per_node, args.nnodes, args.ray_address, args.slurm) == (1, 1, None, False)


def test_rendezvous_host_gpus_and_image():
    text = SBATCH.read_text()
    script = "\n".join(commands())
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}" in script
    assert directives()["--gpus-per-node"] == "8"  # the fallback matches the request
    # the image named in the example is the project's image (enroot spells registry#image)
    (example,) = re.findall(r"e\.g\. (\S+#\S+)", text)
    assert example.replace("#", "/", 1) in set(image_refs().values())
    assert '--container-image="$LVD_IMAGE"' in script and "/data:/data" in script
