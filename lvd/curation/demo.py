"""Build the demo dump: real photos, copies of them, broken files, odd encodings, a hostile tar
and a small Parquet dump, with what curation should conclude about each input.

Everything comes from pictures shipped inside scikit-image / scikit-learn, so the demo runs
offline on a fresh machine. The same dump is the end-to-end test fixture: `DemoDump` holds
the expectations the tests (and a curious user) can check the ledger against.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lvd.curation import copies, testdata


@dataclass(frozen=True, kw_only=True)
class DemoDump:
    """A demo dump and what curation should find in it (all keys are ledger `source`s)."""

    root: Path
    inputs: list[str]
    rejections: dict[str, str] = field(default_factory=dict)  # source -> reason
    odd_valid: list[str] = field(default_factory=list)  # must pass ingest
    exact_copies: dict[str, str] = field(default_factory=dict)  # copy -> its byte-identical original
    near_copies: dict[str, list[str]] = field(default_factory=dict)  # original -> transformed copies


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _photos_and_copies(folder: Path, dump: DemoDump, n_photos: int | None) -> list[tuple[str, bytes]]:
    """Originals in photos/, one copy of each kind (`copies.COPY_KINDS`) in reposts/ (sorting
    after photos/, so the original of exact copies is the one the ledger keeps)."""
    originals = []
    for i, (name, img) in enumerate(copies.real_photos()[:n_photos]):
        data = copies.encode_original(img)
        original = _write(folder / "photos" / f"{name}.jpg", data)
        near = []
        for kind, blob in sorted(copies.make_copies(img, seed=i).items()):
            source = _write(folder / "reposts" / f"{name}__{kind}{_ext(blob)}", blob)
            if kind == "exact":
                dump.exact_copies[source] = original
            else:
                near.append(source)
        dump.near_copies[original] = near
        originals.append((original, data))
    return originals


def _ext(blob: bytes) -> str:
    with Image.open(io.BytesIO(blob)) as im:
        return "." + (im.format or "bin").lower().replace("jpeg", "jpg")


def _parquet(path: Path, originals: list[tuple[str, bytes]], dump: DemoDump) -> None:
    """Rows: byte copies of two originals, a null image, and bytes that are not a picture."""
    images = [originals[0][1], originals[1][1], None, b"no picture here" * 8]
    pq.write_table(
        pa.table(
            {
                "image": pa.array(images, pa.binary()),
                "caption": ["first photo again", "second photo again", "missing", "junk"],
            }
        ),
        path,
    )
    dump.exact_copies[f"{path}::0"] = originals[0][0]
    dump.exact_copies[f"{path}::1"] = originals[1][0]
    dump.rejections.update({f"{path}::2": "empty", f"{path}::3": "not_image"})


def build_demo_dump(root: Path | str, *, n_photos: int | None = None) -> DemoDump:
    """Write the demo dump under `root` (replacing it) and return it with its expectations."""
    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    folder, tar, table = root / "folder", root / "hostile.tar", root / "table.parquet"
    dump = DemoDump(root=root, inputs=[str(folder), str(tar), str(table)])
    originals = _photos_and_copies(folder, dump, n_photos)
    for name, reason in testdata.write_bad_inputs(folder / "bad").items():
        dump.rejections[str(folder / "bad" / name)] = reason
    dump.odd_valid.extend(str(folder / "odd" / n) for n in testdata.write_odd_valid_inputs(folder / "odd"))
    for source, want in testdata.write_hostile_tar(tar).items():
        if want != "accepted":
            dump.rejections[source] = want
    _parquet(table, originals, dump)
    return dump


KNN_PHOTO_CLASSES = ("astronaut", "coffee", "chelsea")  # fallback classes without Fashion-MNIST


def build_knn_folders(
    root: Path | str, *, per_class_train: int = 20, per_class_val: int = 10, size: int = 56
) -> tuple[Path, Path]:
    """Labelled folders ROOT/{train,val}/<class>/*.png for the demo's k-NN evaluation.

    Fashion-MNIST (10 classes) when the Debian dataset is installed; otherwise random crops
    of three scikit-image photos, one class per photo (an easy task: it checks the plumbing,
    not the features). Replaces ROOT.
    """
    import numpy as np

    from lvd import datasets

    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    train, val = root / "train", root / "val"
    try:
        x, y = datasets.load_fashion_mnist("test")
    except FileNotFoundError:
        _photo_crop_folders(train, val, per_class_train, per_class_val, size)
        return train, val
    picks = np.concatenate(
        [np.flatnonzero(y == c)[: per_class_train + per_class_val] for c in range(len(datasets.FASHION_MNIST_CLASSES))]
    )
    is_train = np.concatenate(
        [
            np.arange(len(np.flatnonzero(y == c)[: per_class_train + per_class_val])) < per_class_train
            for c in range(len(datasets.FASHION_MNIST_CLASSES))
        ]
    )
    datasets.write_labelled_folder(x[picks[is_train]], y[picks[is_train]], train, size=size)
    datasets.write_labelled_folder(x[picks[~is_train]], y[picks[~is_train]], val, size=size)
    return train, val


def _photo_crop_folders(train: Path, val: Path, n_train: int, n_val: int, size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    photos = dict(copies.real_photos())
    for name in KNN_PHOTO_CLASSES:
        img = photos[name].convert("RGB")
        side = min(img.size) // 3
        for i in range(n_train + n_val):
            left = int(rng.integers(0, img.width - side))
            top = int(rng.integers(0, img.height - side))
            d = (train if i < n_train else val) / name
            d.mkdir(parents=True, exist_ok=True)
            img.crop((left, top, left + side, top + side)).resize((size, size)).save(d / f"{i:04d}.png")
