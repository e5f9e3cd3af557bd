"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: `OUT/checkpoints/step_NNNNNNN/` holds
- the DCP files (`.metadata` + shards: student, teacher, optimizer, loss centres), for resume;
- `teacher_backbone.safetensors` + `teacher_backbone.json` (its BackboneConfig, crop size,
  width, depth): the only files `load_teacher_backbone` / `load_backbone` read;
- `rng-rankR.safetensors`: each rank's torch / CUDA / numpy / python RNG state as integer
  tensors, the few scalars as JSON in the safetensors header;
- `meta.json` (step, world size, recipe, and the data plan with every stream's position).
A checkpoint resumes on any number of ranks up to the run's data streams: DCP reshards the
weights, optimizer state and centres to the new FSDP2 mesh on load (`dcp.load` plans by each
tensor's global offsets, so 2 shards load into 1 whole tensor or the reverse), the data plan
is remapped (data/plan.py) and RNG states are restored per rank (see `restore_rank_rng`).
Every file is written into `step_NNNNNNN.tmp/`, fsynced with the folder, and the folder is
renamed (or atomically swapped with an existing step of the same number) only when complete;
older steps are pruned after that rename is on disk, so a crash never loses the last
complete checkpoint. DCP works in one process without a process group, and with FSDP2
DTensors unchanged.

Trust: DCP stores its `.metadata` as a pickle and non-tensor values (optimizer settings) as
torch.save pickles. lvd reads `.metadata` through `read_dcp_metadata`, an unpickler that
admits only DCP's metadata classes, torch.Size, dtypes and paths, and the values through
`torch.load(weights_only=True)`; anything else is refused with `UnsafeCheckpointError`
naming the file. Backbones are never loaded from DCP at all. A checkpoint written by an
older lvd (no safetensors backbone, `rng-rankR.pt`) can be completed in place with
`python -m lvd.pretrain.checkpoint convert DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

STEP_DIR = re.compile(r"^step_(\d{7})$")
META_FILE = "meta.json"
DCP_METADATA = ".metadata"
BACKBONE_WEIGHTS = "teacher_backbone.safetensors"
BACKBONE_CONFIG = "teacher_backbone.json"
BACKBONE_FORMAT = "lvd-teacher-backbone"
RNG_FORMAT = "lvd-rng"
FORMAT_VERSION = 1
CONVERT = "python -m lvd.pretrain.checkpoint convert"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something lvd refuses to unpickle (it could run code)."""


class LegacyCheckpointError(ValueError):
    """A checkpoint lacks the safetensors files this lvd loads from (an older lvd wrote it)."""


@dataclass(frozen=True)
class CheckpointMeta:
    step: int  # optimizer steps done; training resumes at this step index
    data_batches: int  # batches each rank's loader has yielded
    world_size: int
    recipe: dict[str, Any]
    # the data plan (lvd.pretrain.data.plan.DataPlan.to_dict) and every stream's position at
    # `step`: what lets a resume on another world size continue each stream where it stopped.
    # None in checkpoints of an lvd before elastic resume.
    data: dict[str, Any] | None = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process call even with no_dist=True; that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def list_checkpoints(path: str | Path) -> list[Path]:
    """Complete checkpoints under a run's OUT folder or its `checkpoints/`, oldest first."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))


def latest_checkpoint(path: str | Path) -> Path | None:
    """A complete checkpoint dir itself, or the latest one under a run's OUT folder."""
    path = Path(path)
    if is_complete(path):
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


# ---------------------------------------------------------------- durable files


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem fsyncs a folder
        _fsync_file(path)


def _write_durable(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- RNG state without pickle


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # a node with fewer visible GPUs than the one that saved: the devices it has
        for i, cuda in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda, i)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def save_rng_state(path: Path, state: dict[str, Any] | None = None) -> None:
    """`state` (default: this process's) as integer tensors + a JSON header; no pickle."""
    from safetensors.torch import save

    state = rng_state() if state is None else state
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    py_version, py_internal, py_gauss_next = state["python"]
    tensors = {
        "torch": state["torch"].detach().cpu().contiguous(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
    }
    for i, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda_{i}"] = cuda.detach().cpu().contiguous()
    header = {
        "format": RNG_FORMAT,
        "version": FORMAT_VERSION,
        "cuda_devices": len(state.get("cuda", [])),
        "numpy": {
            "name": np_name,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "gauss_next": py_gauss_next},
    }
    _write_durable(path, save(tensors, metadata={"lvd": json.dumps(header)}))


def load_rng_state(path: Path) -> dict[str, Any]:
    """The state `save_rng_state` wrote; malformed files raise ValueError naming `path`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("lvd", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        if not isinstance(header, dict) or header.get("format") != RNG_FORMAT:
            raise ValueError("no lvd RNG header")
        npy, py = header["numpy"], header["python"]
        keys = tensors["numpy_keys"]
        if (keys.dtype, tuple(keys.shape), tensors["torch"].dtype) != (torch.int64, (624,), torch.uint8):
            raise ValueError("unexpected tensor shapes or dtypes")
        gauss_next = py["gauss_next"]
        if gauss_next is not None and not isinstance(gauss_next, float):
            raise ValueError("python gauss_next is not a float")
        state = {
            "torch": tensors["torch"],
            "numpy": (
                str(npy["name"]),
                keys.numpy().astype(np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            ),
            "python": (int(py["version"]), tuple(int(x) for x in tensors["python_internal"].tolist()), gauss_next),
        }
        n_cuda = int(header.get("cuda_devices", 0))
        if n_cuda:
            state["cuda"] = [tensors[f"cuda_{i}"] for i in range(n_cuda)]
    except Exception as e:  # safetensors, JSON, key and type errors alike
        raise ValueError(f"{path} is not an lvd RNG state file: {type(e).__name__}: {e}") from None
    return state


def _load_legacy_rng(path: Path) -> dict[str, Any]:
    """`rng-rankR.pt` of an older lvd, through torch's weights-only unpickler: tensors,
    plain containers and numpy arrays only. A file holding anything else is refused."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    allowed = [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it (it holds more than RNG state, and loading it "
            f"could run code): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        raise ValueError(f"{path} is not an lvd RNG state file")
    return state


# ---------------------------------------------------------------- DCP metadata, restricted

_DCP_METADATA_CLASSES = frozenset(
    [
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    ]
)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's `Metadata` is made of; every other global is refused."""

    def __init__(self, file, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle {module}.{name}; a DCP .metadata file holds "
            "only torch.distributed.checkpoint metadata, so this one was not written by lvd "
            "(loading it could run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source}: refusing a persistent id in DCP metadata")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """DCP's `.metadata` file, unpickled with `_DCPMetadataUnpickler` and checked."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            metadata = _DCPMetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated, or allowed classes called with wrong arguments
        raise ValueError(f"{path} is not a readable DCP metadata file: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path} does not hold DCP Metadata (got {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path} names a data file outside its folder: {rel!r}")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_dcp_metadata` instead of pickle.load.
    (Tensor data DCP already reads with `torch.load(weights_only=True)`.)"""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        metadata = read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values (optimizer settings) are read with
    `torch.load(weights_only=True)`; the default unpickles them without restriction."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r}: refusing to unpickle it "
                f"(loading it could run code): {str(e).splitlines()[0]}"
            ) from None
        # hand the checked plain value to the default planner, re-serialised by us
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _dcp_load(state: dict[str, Any], ckpt: Path, *, local: bool = False) -> None:
    """`dcp.load` through `SafeFileSystemReader` and `SafeLoadPlanner`; a refused file
    raises its `UnsafeCheckpointError` (not DCP's wrapper listing every rank's traceback).
    A collective under a process group unless `local` (one rank reads plain tensors alone)."""
    read_dcp_metadata(ckpt / DCP_METADATA)  # refuse a hostile file here, with its name
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(ckpt),
                planner=SafeLoadPlanner(),
                no_dist=local or not _distributed(),
            )
    except dcp.api.CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{ckpt}: {exc}") from None
        raise


def load_state(ckpt: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (nested dicts of plain tensors, any subset of what was saved) from a
    checkpoint's DCP files through the restricted reader, in this process alone (no
    collective: one rank may call it); any world size may have written them. No RNG, no
    meta: for starting something new."""
    _dcp_load(state, Path(ckpt), local=True)


# ---------------------------------------------------------------- the teacher backbone


def _gather_backbone(teacher: Any) -> dict[str, torch.Tensor] | None:
    """The teacher backbone's full tensors on CPU (rank 0; None elsewhere). A collective
    under FSDP2: every rank walks the same keys."""
    from torch.distributed.tensor import DTensor

    if not isinstance(teacher, dict):
        return None
    out = {}
    for key, value in teacher.items():
        if not key.startswith("backbone."):
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if _rank() == 0:
            out[key[len("backbone.") :]] = full.detach().to("cpu").contiguous()
    return out if _rank() == 0 and out else None


def backbone_config(recipe: dict[str, Any], weights: dict[str, torch.Tensor], step: int) -> dict:
    from lvd.pretrain.recipes import Recipe

    r = Recipe.from_dict(recipe)
    depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
    return {
        "format": BACKBONE_FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "backbone": asdict(r.backbone),
        "img_size": r.crops.global_size,
        "embed_dim": int(weights["cls_token"].shape[-1]) if "cls_token" in weights else None,
        "depth": depth,
    }


def write_backbone(folder: Path, weights: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(folder / BACKBONE_WEIGHTS), metadata={"format": "pt"})
    os.chmod(folder / BACKBONE_WEIGHTS, 0o644)  # safetensors creates it 0600, unlike the rest
    _fsync_file(folder / BACKBONE_WEIGHTS)
    _write_durable(folder / BACKBONE_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())


def _backbone_from_config(path: Path):
    """A `BackboneConfig` and crop size from `teacher_backbone.json`, every field checked."""
    from lvd.pretrain.models.vit import ARCHITECTURES
    from lvd.pretrain.recipes import BackboneConfig

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not an lvd teacher-backbone config: {why}")

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise bad(str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("format") != BACKBONE_FORMAT:
        raise bad(f"format is not {BACKBONE_FORMAT!r}")
    if cfg.get("version") != FORMAT_VERSION:
        raise bad(f"version {cfg.get('version')!r}; this lvd reads version {FORMAT_VERSION}")
    bb, img_size = cfg.get("backbone"), cfg.get("img_size")
    if not isinstance(bb, dict):
        raise bad("no backbone section")
    kinds = {
        "arch": (str,),
        "patch_size": (int,),
        "num_register_tokens": (int,),
        "drop_path_rate": (int, float),
        "layerscale_init": (int, float),
    }
    known = {f.name for f in fields(BackboneConfig)}
    for key, value in bb.items():
        if key not in known:
            raise bad(f"unknown backbone field {key!r}")
        if key in kinds and (isinstance(value, bool) or not isinstance(value, kinds[key])):
            raise bad(f"backbone.{key} = {value!r}")
    if bb.get("arch") not in ARCHITECTURES:
        raise bad(f"unknown arch {bb.get('arch')!r}")
    if bb.get("patch_size", 1) < 1 or bb.get("num_register_tokens", 0) < 0:
        raise bad("patch_size < 1 or num_register_tokens < 0")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 0 < img_size <= 4096:
        raise bad(f"img_size = {img_size!r}")
    try:
        return BackboneConfig(**bb), img_size
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None


def legacy_message(ckpt: Path) -> str:
    return (
        f"{ckpt} has no {BACKBONE_WEIGHTS} / {BACKBONE_CONFIG}: an older lvd wrote it. lvd "
        "loads a backbone only from those files, never from DCP's pickled files. To add "
        f"them (DCP read through a restricted unpickler; run it only on a folder you "
        f"trust): {CONVERT} {ckpt}"
    )


def load_teacher_backbone(path: str | Path) -> torch.nn.Module:
    """The teacher's `VisionTransformer` (eval mode, CPU) from a checkpoint or run folder,
    read from `teacher_backbone.safetensors` + `teacher_backbone.json` only."""
    from safetensors.torch import load_file

    from lvd.pretrain.models.strict import load_strict

    ckpt = resolve_checkpoint(path)
    weights, config = ckpt / BACKBONE_WEIGHTS, ckpt / BACKBONE_CONFIG
    if not weights.is_file() or not config.is_file():
        raise LegacyCheckpointError(legacy_message(ckpt))
    backbone_cfg, img_size = _backbone_from_config(config)
    backbone = backbone_cfg.build(img_size=img_size)
    try:
        sd = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from None
    load_strict(backbone, sd, source=str(weights))
    return backbone.eval()


# ---------------------------------------------------------------- save / load


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final` and make the rename durable. An existing `final`
    (the same step saved again) is swapped out atomically where the OS can, so at every
    moment one complete copy of the step sits under its name."""
    if not final.exists():
        os.replace(tmp, final)
    elif _rename_exchange(tmp, final):
        _fsync_dir(final.parent)
        shutil.rmtree(tmp)  # now the old copy
    else:
        aside = final.with_name(final.name + ".old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside)
    _fsync_dir(final.parent)


def save_checkpoint(
    out: str | Path,
    state: dict[str, Any],
    meta: CheckpointMeta,
    *,
    keep: int,
) -> Path:
    """Write `state` (nested dicts of tensors) + meta + this rank's RNG + the teacher
    backbone as safetensors; publish the step; only then keep the newest `keep`."""
    final = checkpoint_dir(out, meta.step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())  # DCP fsyncs its files
    backbone = _gather_backbone(state.get("teacher"))  # a collective under FSDP2
    save_rng_state(tmp / rng_file(_rank()))
    _barrier()
    if _rank() == 0:
        if backbone is not None:
            write_backbone(tmp, backbone, backbone_config(meta.recipe, backbone, meta.step))
        _write_durable(tmp / META_FILE, json.dumps(asdict(meta), indent=2, sort_keys=True).encode())
        for f in tmp.iterdir():  # other ranks' files too (a shared filesystem)
            _fsync_file(f)
        _fsync_dir(tmp)
        _publish(tmp, final)
        prune_checkpoints(out, keep=keep)  # after the new step is on disk under its name
    _barrier()
    return final


def prune_checkpoints(out: str | Path, *, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def read_meta(ckpt: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(ckpt) / META_FILE).read_text()))


def _drop_unsaved(tree: dict[str, Any], saved: set[str], prefix: str) -> dict[str, Any]:
    """`tree` without the entries under `prefix` that the checkpoint does not hold."""
    out = {}
    for key, value in tree.items():
        flat = f"{prefix}.{key}"
        if flat in saved or any(k.startswith(flat + ".") for k in saved):
            out[key] = _drop_unsaved(value, saved, flat) if isinstance(value, dict) else value
    return out


def load_rank_rng(ckpt: Path, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s RNG state of a checkpoint: `rng-rankR.safetensors`, else an older
    lvd's `rng-rankR.pt` through the weights-only unpickler; None if neither exists."""
    new, legacy = ckpt / rng_file(rank), ckpt / f"rng-rank{rank}.pt"
    if new.exists():
        return load_rng_state(new)
    if legacy.exists():
        return _load_legacy_rng(legacy)
    return None


def load_checkpoint(
    ckpt: str | Path,
    state: dict[str, Any],
    *,
    optional: tuple[str, ...] = ("optimizer",),
) -> CheckpointMeta:
    """Load in place into `state` (same structure as saved) and restore this rank's RNG.

    Under the `optional` top-level keys, entries missing from the checkpoint are dropped
    from `state` instead of failing: AdamW has no state for a parameter that never had a
    gradient (the prototypes while frozen), yet the pre-allocated optimizer state has one.
    Everything else (weights, centres) must be present.
    """
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no .metadata/{META_FILE})")
    # read every untrusted pickle-ish file before touching any state
    saved = set(read_dcp_metadata(ckpt / DCP_METADATA).state_dict_metadata)
    rng = load_rank_rng(ckpt, _rank())
    for key in optional:
        state[key] = _drop_unsaved(state[key], saved, key)
    _dcp_load(state, ckpt)
    meta = read_meta(ckpt)
    restore_rank_rng(rng, step=meta.step)
    return meta


def restore_rank_rng(rng: dict[str, Any] | None, *, step: int) -> None:
    """This rank's saved RNG state; a rank the checkpoint has no file for (a resume on more
    ranks than wrote it) gets generators seeded from (its current seed, `step`) instead.

    Ranks 0..N-1 of a resume on N' ranks continue their own streams of drop-path and other
    torch / numpy / python draws; rank r >= N starts fresh ones that depend on the run's
    seed and rank (the trainer has seeded it with seed + rank) and on the step, so they are
    not a replay of its draws at step 0. (Crops and masks do not use these generators: they
    are seeded per sample, see data/shards.py.)
    """
    if rng is not None:
        set_rng_state(rng)
        return
    seed = np.random.SeedSequence([torch.initial_seed(), step]).generate_state(2, np.uint32)
    torch.manual_seed(int(seed[0]) << 32 | int(seed[1]))
    np.random.seed(seed)
    random.seed(int(seed[0]) << 32 | int(seed[1]))


def resolve_checkpoint(path: str | Path) -> Path:
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}; pass a step_NNNNNNN dir or a run's --out folder")
    return ckpt


# ---------------------------------------------------------------- converting old checkpoints


def convert_checkpoint(ckpt: str | Path) -> list[str]:
    """Add the safetensors backbone and RNG files to a checkpoint an older lvd wrote.
    DCP is read through `SafeFileSystemReader` / `SafeLoadPlanner` and old RNG files through
    the weights-only unpickler, so a hostile file is refused, not run. Returns what it wrote."""
    from lvd.pretrain.recipes import Recipe

    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no .metadata/{META_FILE})")
    meta, wrote = read_meta(ckpt), []
    if not (ckpt / BACKBONE_WEIGHTS).is_file() or not (ckpt / BACKBONE_CONFIG).is_file():
        recipe = Recipe.from_dict(meta.recipe)
        sd = recipe.backbone.build(img_size=recipe.crops.global_size).state_dict()
        _dcp_load({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, ckpt)
        write_backbone(ckpt, sd, backbone_config(meta.recipe, sd, meta.step))
        wrote += [BACKBONE_WEIGHTS, BACKBONE_CONFIG]
    for rank in range(meta.world_size):
        legacy = ckpt / f"rng-rank{rank}.pt"
        if legacy.exists() and not (ckpt / rng_file(rank)).exists():
            save_rng_state(ckpt / rng_file(rank), _load_legacy_rng(legacy))
            wrote.append(rng_file(rank))
    _fsync_dir(ckpt)
    return wrote


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=CONVERT.rsplit(" ", 1)[0],
        description="Complete checkpoints written by an older lvd with the files this lvd "
        f"loads from ({BACKBONE_WEIGHTS}, {BACKBONE_CONFIG}, rng-rankR.safetensors).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint dir, or every one of a run's --out")
    c.add_argument("path", type=Path)
    args = p.parse_args(argv)
    ckpts = [args.path] if is_complete(args.path) else list_checkpoints(args.path)
    if not ckpts:
        print(f"error: no complete checkpoint at {args.path}", file=sys.stderr)
        return 2
    for ckpt in ckpts:
        try:
            wrote = convert_checkpoint(ckpt)
        except (UnsafeCheckpointError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{ckpt}: {'wrote ' + ', '.join(wrote) if wrote else 'already converted'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
