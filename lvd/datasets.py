"""Small local datasets for tests and benchmarks: Fashion-MNIST, labelled folders, shards.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz); nothing is downloaded.
`write_shards` writes the curation -> pretraining WebDataset layout (docs/architecture.md,
"Shards"): `shard-NNNNNN.tar` with `KEY.jpg` + `KEY.json`, and `manifest.parquet` — a
stand-in for `lvd curate` output in tests and benchmarks (no cluster/retrieval data).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
_FILES = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split "train" (60k) or "test" (10k)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    images = root / f"{_FILES[split]}-images-idx3-ubyte.gz"
    labels = root / f"{_FILES[split]}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}; install it with `apt-get install dataset-fashion-mnist`"
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def to_rgb(image: np.ndarray, size: int | None = None) -> Image.Image:
    """A grayscale or RGB uint8 array as an RGB image, short side upscaled to `size`."""
    img = Image.fromarray(image).convert("RGB")
    if size is not None and min(img.size) < size:
        scale = size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    return img


def write_labelled_folder(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | Path,
    *,
    size: int = 32,
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES,
) -> Path:
    """Write `OUT/<class>/<index>.png` (short side >= size); returns OUT."""
    out = Path(out)
    for i, (image, label) in enumerate(zip(images, labels)):
        d = out / class_names[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        to_rgb(image, size).save(d / f"{i:07d}.png")
    return out


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: same bytes each run
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    images: np.ndarray,
    out: str | Path,
    *,
    samples_per_shard: int = 256,
    size: int = 32,
    quality: int = 95,
) -> list[Path]:
    """Write images as WebDataset shards plus manifest.parquet; returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    shards = []
    for s, start in enumerate(range(0, len(images), samples_per_shard)):
        path = out / f"shard-{s:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        shard_rows = []
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + samples_per_shard, len(images))):
                buf = io.BytesIO()
                img = to_rgb(images[i], size)
                img.save(buf, format="JPEG", quality=quality)
                data = buf.getvalue()
                uid = hashlib.sha256(data).hexdigest()
                key = f"{i:09d}"
                meta = {
                    "uid": uid,
                    "source": f"array::{i}",
                    "width": img.width,
                    "height": img.height,
                    "cluster_ids": [],
                    "retrieval": {},
                    "jpg_width": img.width,
                    "jpg_height": img.height,
                }
                _add_member(tar, f"{key}.jpg", data)
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
                shard_rows.append({"key": key, "uid": uid, "source": meta["source"], "shard": path.name})
        os.replace(tmp, path)
        blob = path.read_bytes()
        shard_info = {
            "shard_sha256": hashlib.sha256(blob).hexdigest(),
            "shard_samples": len(shard_rows),
            "shard_bytes": len(blob),
        }
        rows += [{**r, **shard_info} for r in shard_rows]
        shards.append(path)
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return shards
