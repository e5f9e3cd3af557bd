"""`lvd pretrain`: train DINOv2 on curation shards, in one process or on many ranks.

Launchers (one per call; each runs the same per-rank function, `lvd.pretrain.launch`):
- default: one process (CPU, or a GPU when present); also what each rank runs when you start
  `torchrun ... -m lvd.cli pretrain ...` yourself;
- `--nproc-per-node N`: N FSDP2 ranks on this machine through torch's elastic launcher (what
  `torchrun --standalone` does); with `--nnodes M --rdzv-endpoint HOST:PORT`, run the same
  command on each of the M machines and they meet at that c10d rendezvous;
- `--ray-address ADDR`: `--ray-workers` Ray Train workers (TorchTrainer) on a Ray cluster;
- `--slurm`: a submitit job of `--nnodes` x `--nproc-per-node` tasks (`--slurm-local`: run
  the job on this machine through submitit's local executor, for testing).

Every rank writes its part of each checkpoint into --out: with ranks on several machines,
--out (and --shards) must be on a filesystem every machine mounts at the same path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED_FS = (
    "with ranks on several machines, OUT must be a filesystem they all mount at the "
    "same path (every rank writes its checkpoint shards there)"
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a DINOv2 ViT on WebDataset shards written by `lvd curate`",
        description="Pretrain a DINOv2 ViT on curation shards: one process by default; "
        "--nproc-per-node/--nnodes (torchrun), --ray-address (Ray Train) or "
        "--slurm (submitit) start several ranks, which shard the model with FSDP2.",
    )
    p.add_argument(
        "--shards",
        required=True,
        nargs="+",
        metavar="SHARDS",
        help="shard folder (e.g. RUN/shards), tar files, or {000000..000009} brace patterns",
    )
    p.add_argument(
        "--recipe",
        default="vits14",
        help="named recipe: tiny, vits14, vitb14, vitl14, vitg14, or a distillation "
        "pair tiny_distill, vits14_distill, vitb14_distill, vitl14_distill "
        "(default: vits14)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON settings over the recipe, nested by section "
        "({crops: {n_local: 4}}); a run's OUT/config.json gives back its recipe",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="change one recipe setting, after --config; repeatable. Every field of "
        "the recipe (see OUT/config.json): e.g. --set crops.n_local=4 --set "
        "optim.base_lr=1e-3 --set crops.local_scale=0.05,0.32 --set batch_size=16",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="SPEC",
        help="start student and teacher backbones from these weights: an official "
        "DINOv2 .pth, an HF Dinov2 folder or an lvd run/checkpoint (its heads "
        "too, when their shapes fit); OUT/init.json lists what was loaded and "
        "what started fresh. Ignored when --resume finds a checkpoint",
    )
    p.add_argument(
        "--distill-from",
        default=None,
        metavar="SPEC",
        help="distil from this frozen teacher (same kinds as --init; an lvd run "
        "gives its heads too): the student learns the teacher's DINO and iBOT "
        "targets; the checkpoints' teacher is the student's EMA. Same as --set "
        "distill.teacher=SPEC; the *_distill recipes name the pairs",
    )
    p.add_argument(
        "--highres-from",
        default=None,
        metavar="RUN",
        help="DINOv2's high-resolution phase after RUN (an lvd run's --out or one of "
        "its checkpoints): RUN's recipe with 518 px global crops (37 patches a "
        "side), its schedules compressed into 10k iterations and a tenth of its "
        "base lr; student, teacher, heads and centres start from RUN with "
        "position embeddings interpolated, AdamW and schedules anew. --set "
        "changes any of it (e.g. --set crops.global_size=448); OUT/phase.json "
        "lists what was loaded",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help=f"output folder: config.json, metrics.jsonl, checkpoints/, pictures/; {SHARED_FS}",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (schedules still follow the recipe's length)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per step and rank (default: the recipe's)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in --out, if any; on "
        "any number of ranks up to the run's data streams (each stream goes on "
        "where it stopped)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="data-loading worker processes per rank (0: load in the rank's process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for model init, crops and masks")
    p.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda when available, else cpu; Ray workers use the device Ray assigns)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="use deterministic torch algorithms (bit-exact resume on CPU; slower)",
    )
    _add_torchrun_args(p.add_argument_group("torchrun (one or several machines)"))
    _add_ray_args(p.add_argument_group("Ray Train (on a Ray cluster)"))
    _add_slurm_args(p.add_argument_group("Slurm (through submitit)"))
    p.set_defaults(func=main)


def _add_torchrun_args(g) -> None:
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="ranks per machine (FSDP2; gloo on CPU, NCCL with one GPU per rank); with --slurm: tasks per node",
    )
    g.add_argument(
        "--nnodes",
        type=int,
        default=1,
        metavar="M",
        help="machines; without --slurm, run this same command on each of them with the same --rdzv-endpoint",
    )
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="c10d rendezvous: a free port on one of the machines that all of them reach (needed when --nnodes > 1)",
    )
    g.add_argument(
        "--rdzv-id",
        default="lvd-pretrain",
        metavar="ID",
        help="rendezvous id, the same on every machine of one run (default: lvd-pretrain)",
    )


def _add_ray_args(g) -> None:
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="train on Ray Train workers: 'auto' (the cluster this machine is part "
        "of, e.g. on its head node), 'local' (start a Ray here), HOST:6379 or "
        "ray://HOST:10001; every worker needs lvd installed (the lvd image)",
    )
    g.add_argument(
        "--ray-workers", type=int, default=None, metavar="N", help="Ray Train workers, one rank each (default: 1)"
    )
    g.add_argument(
        "--ray-cpus-per-worker", type=float, default=None, metavar="C", help="CPUs each worker reserves (default: 1)"
    )
    g.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs each worker reserves; > 0 trains over NCCL (default: 0, CPU workers over gloo)",
    )


def _add_slurm_args(g) -> None:
    g.add_argument(
        "--slurm",
        action="store_true",
        help="submit the training as a Slurm job through submitit (from a login "
        "node; --nnodes nodes x --nproc-per-node tasks), wait for it, print "
        "the job id and log paths",
    )
    g.add_argument("--slurm-partition", default=None, help="Slurm partition")
    g.add_argument(
        "--slurm-time-min", type=int, default=None, metavar="MIN", help="job time limit in minutes (default: 60)"
    )
    g.add_argument(
        "--slurm-gpus-per-node",
        type=int,
        default=None,
        metavar="G",
        help="GPUs per node, equal to --nproc-per-node (default: 0, CPU ranks)",
    )
    g.add_argument(
        "--slurm-cpus-per-task",
        type=int,
        default=None,
        metavar="C",
        help="CPUs per rank, for it and its --num-workers data loaders (default: the cluster's)",
    )
    g.add_argument(
        "--slurm-folder",
        type=Path,
        default=None,
        help="submitit's folder for the job's pickles and logs (default: OUT/slurm)",
    )
    g.add_argument(
        "--slurm-local",
        action="store_true",
        help="run the submitit job on this machine (submitit's local executor), for testing; one node",
    )
    g.add_argument(
        "--slurm-no-wait", action="store_true", help="print the job id and log paths and return without waiting"
    )


RAY_FLAGS = ("ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker")
SLURM_FLAGS = (
    "slurm_partition",
    "slurm_time_min",
    "slurm_gpus_per_node",
    "slurm_cpus_per_task",
    "slurm_folder",
    "slurm_local",
    "slurm_no_wait",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args: argparse.Namespace, names) -> list[str]:
    return [_flag(n) for n in names if getattr(args, n) not in (None, False)]


def launch_spec(args: argparse.Namespace):
    """The `LaunchSpec` the flags describe; flags of two launchers at once are refused."""
    from lvd.pretrain.launch import LaunchSpec

    if args.ray_address and args.slurm:
        raise ValueError("--ray-address and --slurm pick different launchers: use one")
    stray = (_given(args, SLURM_FLAGS) if not args.slurm else []) + (
        _given(args, RAY_FLAGS) if not args.ray_address else []
    )
    if stray:
        which = "--slurm" if stray[0].startswith("--slurm") else "--ray-address"
        raise ValueError(f"{', '.join(stray)} only apply with {which}")
    common = {"nproc_per_node": args.nproc_per_node, "nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint}
    if args.ray_address:
        if (args.nproc_per_node, args.nnodes, args.rdzv_endpoint) != (1, 1, None):
            raise ValueError(
                "--ray-address runs one rank per Ray Train worker: set their "
                "number with --ray-workers, not --nproc-per-node/--nnodes/"
                "--rdzv-endpoint"
            )
        return LaunchSpec(
            kind="ray",
            ray_address=args.ray_address,
            **_set(
                args,
                ray_workers="ray_workers",
                ray_cpus_per_worker="ray_cpus_per_worker",
                ray_gpus_per_worker="ray_gpus_per_worker",
            ),
        )
    if args.slurm:
        return LaunchSpec(
            kind="slurm",
            **common,
            slurm_local=args.slurm_local,
            **_set(
                args,
                slurm_partition="slurm_partition",
                slurm_time_min="slurm_time_min",
                slurm_gpus_per_node="slurm_gpus_per_node",
                slurm_cpus_per_task="slurm_cpus_per_task",
                slurm_folder="slurm_folder",
            ),
        )
    torchrun = (args.nproc_per_node, args.nnodes, args.rdzv_endpoint) != (1, 1, None)
    return LaunchSpec(kind="torchrun" if torchrun else "local", rdzv_id=args.rdzv_id, **(common if torchrun else {}))


def _set(args: argparse.Namespace, **fields: str) -> dict:
    """Spec fields whose flag was given (the others keep LaunchSpec's defaults)."""
    return {f: getattr(args, a) for f, a in fields.items() if getattr(args, a) is not None}


def check_start_specs(recipe, init: str | None) -> None:
    """--init and the distillation teacher exist, and a `*_distill` recipe got a teacher:
    checked before any rank starts (their shapes are checked when the model is built)."""
    from lvd.pretrain.distill import refuse_unset_teacher

    refuse_unset_teacher(recipe)
    for flag, spec in (("--init", init), ("--distill-from", recipe.distill.teacher or None)):
        if spec is not None and not Path(spec).expanduser().exists():
            raise FileNotFoundError(
                f"{flag} {spec}: no such file or folder; pass an official "
                "DINOv2 .pth, an HF Dinov2 folder or an lvd run's --out"
            )


def main(args: argparse.Namespace) -> int:
    from lvd.pretrain.data import expand_shards
    from lvd.pretrain.failures import repeats, stop
    from lvd.pretrain.launch import launch, submit_slurm
    from lvd.pretrain.overrides import OverrideError, resolve_recipe
    from lvd.pretrain.train import TrainConfig

    try:
        # settings first: a wrong key is refused before any shard is listed
        config, sets = args.config, args.sets
        if args.highres_from:
            from lvd.pretrain.highres import highres_overrides

            config, sets = highres_overrides(args.highres_from, config, sets)
        recipe = resolve_recipe(
            args.recipe, config=config, sets=sets, batch_size=args.batch_size, distill_from=args.distill_from
        )
        check_start_specs(recipe, args.init)
    except (OverrideError, FileNotFoundError, ValueError) as e:
        stop(f"lvd pretrain: error: {e}")
    try:
        spec = launch_spec(args)
        shards = tuple(expand_shards(args.shards))
    except (FileNotFoundError, ValueError) as e:
        stop(f"lvd pretrain: error: {e}")
    cfg = TrainConfig(
        shards=shards,
        recipe=recipe,
        out=args.out,
        init=args.init,
        max_steps=args.max_steps,
        resume=args.resume,
        num_workers=args.num_workers,
        seed=args.seed,
        device=args.device,
        deterministic=args.deterministic,
    )
    if spec.kind == "slurm":
        try:
            job = submit_slurm(cfg, spec)
        except RuntimeError as e:
            stop(f"lvd pretrain: error: {e}")
        print(f"submitted job {job.job_id}; rank 0 logs: {job.paths.stdout} {job.paths.stderr}", flush=True)
        if args.slurm_no_wait:
            return 0
        result = job.results()[0]
    else:
        from lvd.pretrain.checkpoint import UnsafeCheckpointError
        from lvd.pretrain.highres import PhaseMismatchError
        from lvd.pretrain.init import InitMismatchError

        try:
            result = launch(cfg, spec)
        # --resume met a file lvd will not unpickle; --init / --distill-from weights that
        # do not fit the recipe; a phase's run of another architecture
        except (UnsafeCheckpointError, InitMismatchError, PhaseMismatchError) as e:
            stop(f"lvd pretrain: error: {e}")
        except Exception as e:  # a multi-rank launch tells a repeating failure by its exit code
            if repeats(e):
                stop(f"lvd pretrain: error: {e}")
            raise
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    print(
        f"trained steps {result.start_step}..{result.end_step} of recipe {recipe.name}; "
        f"last loss {last:.4f}; checkpoint {result.last_checkpoint}"
    )
    return 0
