"""Option groups shared by the `lvd` commands, and the flow parameters built from them.

`lvd curate`, `lvd pipeline` and `lvd demo` take the same curation options; each group is
added here once (`add_*_options`) and read back once (`*_kwargs`), so a flag, its help and the
flow parameter it sets are written in one place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The `--model` help of every command that takes a backbone (lvd.pretrain.models.load_backbone).
MODEL_HELP = "an lvd checkpoint dir or run --out folder, an official DINOv2 .pth, or a Hugging Face Dinov2 folder"


def add_dump_options(p: argparse.ArgumentParser) -> None:
    """What `lvd curate` and `lvd pipeline` read: the pool's dumps, seed sets and eval sets."""
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="DUMP",
        help="folder of images, tar archive, parquet file or folder of them; repeatable",
    )
    p.add_argument(
        "--seeds",
        action="append",
        default=[],
        metavar="DIR_OR_DUMP",
        help="seed set to retrieve pool images near; repeatable (needs an embedder: --embedder, or the "
        "pipeline's bootstrap)",
    )
    p.add_argument(
        "--eval-sets",
        action="append",
        default=[],
        metavar="DIR",
        help="evaluation set whose copies are removed from the pool; repeatable",
    )


def add_curate_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `lvd curate` and `lvd demo`."""
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--partition-size",
        type=int,
        default=256,
        help="files (or parquet rows) per partition: the unit of work, retry and resume",
    )
    p.add_argument(
        "--min-side", type=int, default=32, help="reject images whose shorter side is below this many pixels"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=89_478_485,
        help="reject images with more pixels than this (checked before decoding)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help="reject an input (file, tar member, parquet cell) above N bytes before reading it",
    )
    p.add_argument(
        "--max-decoded-bytes",
        type=int,
        default=256 << 20,
        metavar="N",
        help="reject an image whose full decode needs more than N bytes (from its header)",
    )
    p.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="folder that paths inside inputs (parquet path cells, symlinks) may point into, "
        "besides the dump's own folder; repeatable",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="read http(s)/s3/gs/... URLs named in parquet path cells (off: rejected as remote_path)",
    )
    p.add_argument(
        "--phash-radius",
        type=int,
        default=None,
        help="max pHash Hamming distance of near-duplicates (default: dedup's)",
    )
    p.add_argument(
        "--max-retries", type=int, default=3, help="Ray retries of a partition whose worker process or node died"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset tar")
    p.add_argument(
        "--embedder",
        default=None,
        metavar="SPEC",
        help="lvd checkpoint, official DINOv2 .pth or local HF Dinov2 folder",
    )


def worker_memory(text: str) -> int:
    """--worker-memory's value in bytes (4GiB, 512MiB, 8G, 2e9), refused below what a worker needs."""
    from lvd.curation.scale.budget import WorkerBudget

    try:
        return WorkerBudget.parse(text).worker_bytes
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_image_size_option(p: argparse.ArgumentParser) -> None:
    """--size of `lvd viz` and `lvd segment`."""
    p.add_argument(
        "--size",
        type=int,
        default=448,
        help="shorter image side fed to the backbone, a multiple of its patch size (default 448)",
    )


def add_scale_options(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """The memory budget per worker of the partitioned global stages (lvd.curation.scale.budget):
    the partition sizes (vector shard rows, hash buckets, query blocks) are derived from it."""
    p.add_argument(
        "--worker-memory",
        type=worker_memory,
        default=worker_memory(default) if default else None,
        metavar="SIZE",
        help="most resident memory of one Ray worker of the partitioned stages (e.g. 4GiB, at least 512MiB): the "
        "hash dedup's shuffle (forced when the one-task dedup would not fit), the distributed k-means and the "
        "sharded k-NN (pools large enough to use them) and the ledger's ranges are sized so a worker stays under "
        "it; the shuffle's tasks also ask Ray for that memory. Default: fixed sizes",
    )


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """The embedding-based options of `lvd curate` and `lvd pipeline` (they need an embedder)."""
    p.add_argument(
        "--retrieval",
        choices=["sample", "cluster", "hierarchical"],
        default="sample",
        help="sample: k=4 nearest per seed; cluster: clusters holding >3 seeds; "
        "hierarchical: balanced sampling of a cluster tree to --target-size",
    )
    p.add_argument(
        "--target-size",
        type=int,
        default=None,
        metavar="N",
        help="images to select (balanced sampling), or a cap per seed set with --seeds",
    )
    p.add_argument(
        "--clusters", type=int, default=None, metavar="K", help="k-means clusters (finest level); default sqrt(#images)"
    )
    p.add_argument("--include-seeds", action="store_true", help="ship the seed images too (sample / cluster retrieval)")
    p.add_argument(
        "--vectors",
        default=None,
        metavar="DIR",
        help="precomputed embeddings of the pool instead of running --embedder on it: Parquet files with a uid or "
        "source column and a vector column (vector or embedding), or NAME.npy [n, D] beside NAME.uids.parquet; "
        "L2-normalised on import; an accepted image without a vector, a NaN or a repeated key is refused. Seed and "
        "eval-set images must be in DIR too unless --embedder is given",
    )


def add_copy_options(p: argparse.ArgumentParser) -> None:
    """Copy detection and decontamination options of `lvd curate` and `lvd pipeline`."""
    g = p.add_argument_group("copy detection and decontamination (no model needed)")
    g.add_argument(
        "--copy-model",
        default=None,
        metavar="SPEC",
        help="copy-detection model deciding by cosine: an SSCD TorchScript file "
        "(sscd_disc_mixup.torchscript.pt) or any backbone spec; default: none, "
        "local features + geometric verification decide",
    )
    g.add_argument(
        "--copy-threshold",
        type=float,
        default=None,
        help="copy threshold instead of the calibrated one: RANSAC inliers (default "
        "path) or cosine (--copy-model); reported with its recall and false links",
    )
    g.add_argument(
        "--copy-false-link-rate",
        type=float,
        default=None,
        metavar="RATE",
        help="calibration target: largest fraction of distinct pairs linked (default 0.005)",
    )
    g.add_argument(
        "--copy-candidates",
        type=int,
        default=None,
        metavar="N",
        help="candidate pairs decided per image (default 16; 8 halves the verification "
        "time for about 1.5 points of crop / overlay recall)",
    )
    g.add_argument(
        "--max-remove-fraction",
        type=float,
        default=None,
        metavar="F",
        help="refuse (before the ledger changes) when dedup or copy detection would drop "
        "more than F of their input (default 0.9) or decontamination more than F "
        "of the pool (default 0.5)",
    )
    g.add_argument(
        "--no-copy-detection", action="store_true", help="skip copy detection (hash dedup only); eval sets need it"
    )


def add_hygiene_options(p: argparse.ArgumentParser) -> None:
    """Pool hygiene (lvd.curation.hygiene) options of `lvd curate` and `lvd pipeline`; all off by default."""
    g = p.add_argument_group("pool hygiene (each stage off unless asked for; rejections in the ledger with a reason)")
    g.add_argument(
        "--url-blocklist",
        default=None,
        metavar="FILE",
        help="reject inputs whose url (img2dataset sidecar or parquet url column) matches a rule: "
        "a domain (subdomains too), a shell pattern over the url, or re:REGEX; reason url_blocked",
    )
    g.add_argument(
        "--url-allowlist",
        default=None,
        metavar="FILE",
        help="keep only inputs whose url matches a rule of FILE (same syntax); others, and inputs "
        "without a url, are url_blocked",
    )
    g.add_argument(
        "--max-per-domain",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N distinct images per url domain (the first N by content hash); the rest are domain_capped",
    )
    g.add_argument(
        "--quality-filters",
        action="store_true",
        help="reject near_constant, extreme_aspect, too_blurry and mostly_border images "
        "(thresholds calibrated on the packages' photos; see --quality)",
    )
    g.add_argument(
        "--quality",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a quality threshold (min_contrast, max_aspect, min_sharpness, min_laplacian, "
        "max_border, border_tolerance) or turn one filter off with NAME=off; implies "
        "--quality-filters; repeatable",
    )
    g.add_argument(
        "--blur-faces",
        action="store_true",
        help="detect faces at ingest (OpenCV's bundled Haar cascade) and blur them in the shards",
    )
    g.add_argument(
        "--face-detector",
        default=None,
        metavar="PATH",
        help="a better local face detector: a cascade .xml or a YuNet .onnx file; implies --blur-faces",
    )
    g.add_argument(
        "--nsfw-model",
        default=None,
        metavar="PATH",
        help="TorchScript or ONNX classifier (N x 3 x 224 x 224 RGB in [0,1] -> N logits); images "
        "scoring at least --nsfw-threshold are rejected as nsfw. No default model: without "
        "one the filter is off and the run summary says so",
    )
    g.add_argument(
        "--nsfw-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="sigmoid score from which an image is nsfw (default 0.5)",
    )


def add_training_options(p: argparse.ArgumentParser, *, max_steps: int | None) -> None:
    """Options shared by `lvd pipeline` and `lvd demo`."""
    p.add_argument(
        "--recipe", default="tiny", help="pretraining recipe: tiny, vits14, vitb14, vitl14, vitg14 (default: tiny)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=max_steps,
        metavar="N",
        help="stop pretraining after N steps (default: "
        + ("the recipe's full length)" if max_steps is None else f"{max_steps})"),
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per training step (default: the recipe's)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="data-loading worker processes for training (0: in the training thread)",
    )
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote in k-NN eval")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="training ranks on this machine (FSDP2; a rank that dies is relaunched "
        "from the last checkpoint); --batch-size is then per rank (default: 1)",
    )


def add_run_folder_options(p: argparse.ArgumentParser) -> None:
    """--overwrite / --extend of `lvd curate` and `lvd pipeline` (lvd.runfolder)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--overwrite", action="store_true", help="the --out folder holds another run: delete its outputs and start over"
    )
    g.add_argument(
        "--extend",
        action="store_true",
        help="add these inputs to the run recorded in --out (its earlier inputs must still "
        "exist; the settings must match); without it another run's folder is refused",
    )


def run_mode(args: argparse.Namespace) -> str:
    if getattr(args, "overwrite", False):
        return "overwrite"
    return "extend" if getattr(args, "extend", False) else "resume"


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


def flow_kwargs(args: argparse.Namespace) -> dict:
    dedup = {} if args.phash_radius is None else {"phash_radius": args.phash_radius}
    return dict(
        partition_size=args.partition_size,
        ingest={
            "min_side": args.min_side,
            "max_pixels": args.max_pixels,
            "max_bytes": args.max_bytes,
            "max_decoded_bytes": args.max_decoded_bytes,
            "allow_roots": list(args.allow_root),
            "allow_remote": args.allow_remote,
        },
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
    return dict(
        copy_detection=not args.no_copy_detection,
        copy_model=args.copy_model,
        copydetect=copy,
        max_remove_fraction=args.max_remove_fraction,
    )


def selection_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        seeds=args.seeds,
        eval_sets=args.eval_sets,
        retrieval=args.retrieval,
        target_size=args.target_size,
        retrieve={"include_seeds": True} if args.include_seeds else {},
        cluster={} if args.clusters is None else {"k": args.clusters},
        vectors=str(Path(args.vectors).resolve()) if args.vectors else None,
    )


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


def curate_kwargs(args: argparse.Namespace) -> dict:
    """The `curate` flow's parameters from `lvd curate`'s arguments (all but inputs, out)."""
    scale = {"worker_memory": args.worker_memory} if getattr(args, "worker_memory", None) else {}
    return dict(
        **flow_kwargs(args),
        **selection_kwargs(args),
        **copy_kwargs(args),
        **hygiene_kwargs(args),
        **scale,
        mode=run_mode(args),
    )
