"""`lvd curate`: run the Prefect flow `curate` over input dumps.

Stages: ingest, hash dedup, copy detection (model-free: hashes and k-NN propose candidates,
ORB local features with geometric verification decide, at a threshold calibrated on known
copies of the pool's own images), decontamination against --eval-sets (the same detector),
then with --embedder: embedding, clustering and retrieval (with --seeds or --target-size);
then WebDataset shards (RUN/shards) and the ledger. Without --seeds and --target-size every
image that is not rejected, a duplicate, a copy or contaminated is sharded. Pool hygiene (URL
lists and a per-domain cap, quality filters, an NSFW model, face blurring) is off unless its
options are given. Seeds and a target
size need an embedder; an embedder also proposes copy candidates (it never decides).

A stage that would remove more than --max-remove-fraction of its input stops the run before
the ledger changes, shows its largest groups, and leaves the run folder as it was.

Where it runs: Ray joins `--ray-address` or `RAY_ADDRESS` when given, else starts
locally with every CPU. On a cluster every node must see the inputs and the run folder at
the same paths (a shared filesystem): Ray tasks read inputs and write partition files.

Prefect talks to `PREFECT_API_URL` when set; otherwise Prefect 3 starts a temporary local
server on a database in `PREFECT_HOME`, which lvd defaults to `~/.lvd/prefect` (one place
for every run, so `PREFECT_HOME=~/.lvd/prefect prefect server start` shows them all).

A run folder is resumable: run the same command again after a crash or kill and done
partitions (those with a done-marker matching input and config) are skipped. The folder
records its inputs and settings (RUN/run.json) and is locked while a run works in it
(RUN/.lock): another run into it with other inputs or settings is refused unless
--extend (add inputs) or --overwrite (start over); a second run at the same time is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lvd.flows.commands.checks import (add_run_folder_options, error, flow_failure, folder_refusal, problems,
                                       quiet_console_tracebacks, refuse, run_mode)

DEFAULT_PREFECT_HOME = Path("~/.lvd/prefect")


def prepare_prefect_env() -> str:
    """Pick PREFECT_HOME before Prefect is imported; returns a line saying where runs go."""
    # No telemetry unless the user turns it on (PREFECT_SERVER_ANALYTICS_ENABLED=true): the
    # temporary server would otherwise phone home on every run (an ERROR line when offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect server: {os.environ['PREFECT_API_URL']}"
    home = os.environ.setdefault("PREFECT_HOME", str(DEFAULT_PREFECT_HOME.expanduser()))
    Path(home).mkdir(parents=True, exist_ok=True)
    # The temporary server migrates a new database on first start: on a busy 2-core machine
    # that takes longer than Prefect's 20 s default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The prefect script next to this Python: `prefect` alone is not on PATH in a venv
    # that is not activated (the README's `.venv/bin/lvd demo`).
    prefect = Path(sys.executable).parent / "prefect"
    return (
        f"Prefect runs are stored in {home}; to browse them run:\n"
        f"  PREFECT_HOME={home} {prefect} server start   # then open http://127.0.0.1:4200"
    )


def add_curate_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `lvd curate` and `lvd demo`."""
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--partition-size", type=int, default=256,
                   help="files (or parquet rows) per partition: the unit of work, retry and resume")
    p.add_argument("--min-side", type=int, default=32,
                   help="reject images whose shorter side is below this many pixels")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="reject images with more pixels than this (checked before decoding)")
    p.add_argument("--max-bytes", type=int, default=64 << 20, metavar="N",
                   help="reject an input (file, tar member, parquet cell) above N bytes before reading it")
    p.add_argument("--max-decoded-bytes", type=int, default=256 << 20, metavar="N",
                   help="reject an image whose full decode needs more than N bytes (from its header)")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="folder that paths inside inputs (parquet path cells, symlinks) may point into, "
                        "besides the dump's own folder; repeatable")
    p.add_argument("--allow-remote", action="store_true",
                   help="read http(s)/s3/gs/... URLs named in parquet path cells (off: rejected as remote_path)")
    p.add_argument("--phash-radius", type=int, default=None,
                   help="max pHash Hamming distance of near-duplicates (default: dedup's)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray retries of a partition whose worker process or node died")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset tar")
    p.add_argument("--embedder", default=None, metavar="SPEC",
                   help="lvd checkpoint, official DINOv2 .pth or local HF Dinov2 folder")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "curate", help="curate image dumps into a run folder (ingest, dedup, ledger)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", action="append", required=True, metavar="DUMP",
                   help="folder of images, tar archive, parquet file or folder of them; repeatable")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (reused to resume)")
    p.add_argument("--seeds", action="append", default=[], metavar="DIR_OR_DUMP",
                   help="seed set to retrieve pool images near; repeatable (needs --embedder)")
    p.add_argument("--eval-sets", action="append", default=[], metavar="DIR",
                   help="evaluation set whose copies are removed from the pool; repeatable")
    add_selection_options(p)
    add_copy_options(p)
    add_hygiene_options(p)
    add_curate_options(p)
    add_run_folder_options(p)
    p.set_defaults(func=main, check=check)


def add_hygiene_options(p: argparse.ArgumentParser) -> None:
    """Pool hygiene (lvd.curation.hygiene) options of `lvd curate` and `lvd pipeline`; all off by default."""
    g = p.add_argument_group("pool hygiene (each stage off unless asked for; rejections in the ledger with a reason)")
    g.add_argument("--url-blocklist", default=None, metavar="FILE",
                   help="reject inputs whose url (img2dataset sidecar or parquet url column) matches a rule: "
                        "a domain (subdomains too), a shell pattern over the url, or re:REGEX; reason url_blocked")
    g.add_argument("--url-allowlist", default=None, metavar="FILE",
                   help="keep only inputs whose url matches a rule of FILE (same syntax); others, and inputs "
                        "without a url, are url_blocked")
    g.add_argument("--max-per-domain", type=int, default=None, metavar="N",
                   help="keep at most N distinct images per url domain (the first N by content hash); "
                        "the rest are domain_capped")
    g.add_argument("--quality-filters", action="store_true",
                   help="reject near_constant, extreme_aspect, too_blurry and mostly_border images "
                        "(thresholds calibrated on the packages' photos; see --quality)")
    g.add_argument("--quality", action="append", default=[], metavar="NAME=VALUE",
                   help="set a quality threshold (min_contrast, max_aspect, min_sharpness, min_laplacian, "
                        "max_border, border_tolerance) or turn one filter off with NAME=off; implies "
                        "--quality-filters; repeatable")
    g.add_argument("--blur-faces", action="store_true",
                   help="detect faces at ingest (OpenCV's bundled Haar cascade) and blur them in the shards")
    g.add_argument("--face-detector", default=None, metavar="PATH",
                   help="a better local face detector: a cascade .xml or a YuNet .onnx file; implies --blur-faces")
    g.add_argument("--nsfw-model", default=None, metavar="PATH",
                   help="TorchScript or ONNX classifier (N x 3 x 224 x 224 RGB in [0,1] -> N logits); images "
                        "scoring at least --nsfw-threshold are rejected as nsfw. No default model: without "
                        "one the filter is off and the run summary says so")
    g.add_argument("--nsfw-threshold", type=float, default=0.5, metavar="T",
                   help="sigmoid score from which an image is nsfw (default 0.5)")


def hygiene_kwargs(args: argparse.Namespace) -> dict:
    """The flow's `hygiene` parameter from the pool-hygiene options ({} when none is given)."""
    h: dict = {}
    if args.url_blocklist:
        h["url_blocklist"] = str(Path(args.url_blocklist).resolve())
    if args.url_allowlist:
        h["url_allowlist"] = str(Path(args.url_allowlist).resolve())
    if args.max_per_domain is not None:
        h["max_per_domain"] = args.max_per_domain
    if args.quality_filters or args.quality:
        h["quality"] = quality_settings(args.quality)
    if args.blur_faces or args.face_detector:
        h["faces"] = {"detector": str(Path(args.face_detector).resolve())} if args.face_detector else {}
    if args.nsfw_model:
        h["nsfw"] = {"model": str(Path(args.nsfw_model).resolve()), "threshold": args.nsfw_threshold}
    return {"hygiene": h} if h else {}


def hygiene_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the pool-hygiene options (files, numbers, the NSFW model loading)."""
    from lvd.curation.hygiene import from_options

    if args.max_per_domain is not None and args.max_per_domain < 1:
        return [f"--max-per-domain {args.max_per_domain}: use at least 1"]
    try:
        from_options(hygiene_kwargs(args).get("hygiene"))
    except (ValueError, OSError) as e:
        return [str(e)]
    return []


def quality_settings(pairs: list[str]) -> dict:
    """NAME=VALUE pairs as QualityConfig fields (VALUE off: None); refuses unknown names."""
    from dataclasses import fields

    from lvd.curation.hygiene import QualityConfig

    names = {f.name for f in fields(QualityConfig)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names or not value:
            raise ValueError(f"--quality {pair}: use NAME=VALUE with NAME one of {', '.join(sorted(names))}")
        try:
            out[name] = None if value == "off" else float(value)
        except ValueError:
            raise ValueError(f"--quality {pair}: VALUE is a number or off") from None
    return out


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """The embedding-based options of `lvd curate` and `lvd pipeline` (they need an embedder)."""
    p.add_argument("--retrieval", choices=["sample", "cluster", "hierarchical"], default="sample",
                   help="sample: k=4 nearest per seed; cluster: clusters holding >3 seeds; "
                        "hierarchical: balanced sampling of a cluster tree to --target-size")
    p.add_argument("--target-size", type=int, default=None, metavar="N",
                   help="images to select (balanced sampling), or a cap per seed set with --seeds")
    p.add_argument("--clusters", type=int, default=None, metavar="K",
                   help="k-means clusters (finest level); default sqrt(#images)")
    p.add_argument("--include-seeds", action="store_true",
                   help="ship the seed images too (sample / cluster retrieval)")


def add_copy_options(p: argparse.ArgumentParser) -> None:
    """Copy detection and decontamination options of `lvd curate` and `lvd pipeline`."""
    g = p.add_argument_group("copy detection and decontamination (no model needed)")
    g.add_argument("--copy-model", default=None, metavar="SPEC",
                   help="copy-detection model deciding by cosine: an SSCD TorchScript file "
                        "(sscd_disc_mixup.torchscript.pt) or any backbone spec; default: none, "
                        "local features + geometric verification decide")
    g.add_argument("--copy-threshold", type=float, default=None,
                   help="copy threshold instead of the calibrated one: RANSAC inliers (default "
                        "path) or cosine (--copy-model); reported with its recall and false links")
    g.add_argument("--copy-false-link-rate", type=float, default=None, metavar="RATE",
                   help="calibration target: largest fraction of distinct pairs linked (default 0.005)")
    g.add_argument("--copy-candidates", type=int, default=None, metavar="N",
                   help="candidate pairs decided per image (default 16; 8 halves the verification "
                        "time for about 1.5 points of crop / overlay recall)")
    g.add_argument("--max-remove-fraction", type=float, default=None, metavar="F",
                   help="refuse (before the ledger changes) when dedup or copy detection would drop "
                        "more than F of their input (default 0.9) or decontamination more than F "
                        "of the pool (default 0.5)")
    g.add_argument("--no-copy-detection", action="store_true",
                   help="skip copy detection (hash dedup only); eval sets need it")


def flow_kwargs(args: argparse.Namespace) -> dict:
    dedup = {} if args.phash_radius is None else {"phash_radius": args.phash_radius}
    return dict(
        partition_size=args.partition_size,
        ingest={"min_side": args.min_side, "max_pixels": args.max_pixels, "max_bytes": args.max_bytes,
                "max_decoded_bytes": args.max_decoded_bytes, "allow_roots": list(args.allow_root),
                "allow_remote": args.allow_remote},
        dedup=dedup,
        max_retries=args.max_retries,
        ray_address=args.ray_address,
        embedder=args.embedder,
        shard_size=args.shard_size,
    )


def copy_kwargs(args: argparse.Namespace) -> dict:
    copy = {} if args.copy_threshold is None else {"threshold": args.copy_threshold}
    if args.copy_false_link_rate is not None:
        copy["false_link_rate"] = args.copy_false_link_rate
    if args.copy_candidates is not None:
        copy["max_verify"] = args.copy_candidates
    return dict(copy_detection=not args.no_copy_detection, copy_model=args.copy_model, copydetect=copy,
                max_remove_fraction=args.max_remove_fraction)


def part2_kwargs(args: argparse.Namespace) -> dict:
    return dict(seeds=args.seeds, eval_sets=args.eval_sets, retrieval=args.retrieval, target_size=args.target_size,
                retrieve={"include_seeds": True} if args.include_seeds else {},
                cluster={} if args.clusters is None else {"k": args.clusters})


def run_curate(inputs: list[str], out: str, **kwargs) -> int:
    """Run the flow and print the accounting; 0 when every input is accounted for."""
    inputs = [str(i) for i in inputs]
    if twice := sorted({i for i in inputs if inputs.count(i) > 1}):
        print(f"error: --input given more than once (each input must count once): {', '.join(twice)}",
              file=sys.stderr)
        return 2
    where = prepare_prefect_env()
    from lvd import runfolder
    from lvd.curation import runner
    from lvd.curation.ledger import format_report, verify_run

    try:  # a refused join is one line, before the flow (and Prefect's logging of it) starts
        runner.init_ray(kwargs.get("ray_address"))
    except runner.RayJoinError as e:
        error(str(e))
        return 2
    from lvd.flows.curate import curate

    quiet_console_tracebacks()  # failures end in one `error:` line, not Prefect's tracebacks
    try:
        summary = curate(inputs=inputs, out=str(out), **kwargs)
    except Exception as e:  # refused folder or parameters, a guard's refusal (MassRemovalError), disk full
        if (code := flow_failure(e, out)) is None:
            raise
        return code
    finally:
        runfolder.release_all()
    report = verify_run(Path(out))
    print(format_report(report))
    for line in summary.hygiene:
        print(line)
    print(where)
    return 0 if report.ok else 1


def curate_kwargs(args: argparse.Namespace) -> dict:
    """The `curate` flow's parameters from `lvd curate`'s arguments (all but inputs, out)."""
    return dict(**flow_kwargs(args), **part2_kwargs(args), **copy_kwargs(args), **hygiene_kwargs(args),
                mode=run_mode(args))


def check(args: argparse.Namespace) -> int:
    """Before Prefect and Ray: the arguments, then the run folder (lvd.runfolder); 0 when fine."""
    if found := problems(args, "curate") + hygiene_problems(args):
        return refuse(found)
    from lvd import runfolder

    kw = curate_kwargs(args)
    try:
        runfolder.precheck(args.out, args.input, runfolder.curate_settings(kw), kw["mode"])
    except runfolder.RunFolderError as e:
        return folder_refusal(e)
    return 0


def main(args: argparse.Namespace) -> int:
    return run_curate(args.input, args.out, **curate_kwargs(args))
