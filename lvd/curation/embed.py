"""Embed image bytes with a ViT backbone: L2-normalised CLS vectors as float16.

`Embedder(spec, cfg)` loads the backbone once (`lvd.pretrain.models.load.load_backbone`: an lvd
checkpoint dir or run folder, an official DINOv2 `.pth`, or a local Hugging Face Dinov2 folder;
or a TorchScript descriptor model such as SSCD's `sscd_disc_mixup.torchscript.pt`, for copy
detection),
puts it in eval mode on the GPU when there is one, and then embeds batch after batch; a Ray
actor holds one per process and calls `embed_blobs` per partition.

Preprocessing (stated, configurable in `EmbedConfig`): decode with Pillow, apply the EXIF
orientation, convert to RGB exactly as ingest does (alpha on white, 16-bit scaled), resize the
shorter side to `resize` (bicubic, antialiased), centre-crop `crop` x `crop`, scale to [0, 1]
and normalise with the ImageNet mean/std: the DINOv2 evaluation transform (256 -> 224).
`crop` must be a multiple of the backbone's patch size. At the backbone's native size
(`img_size`) position embeddings are used as trained; elsewhere they are interpolated, and the
three weight formats interpolate as their origin does (see `lvd.pretrain.models.hf`).
JPEGs are decoded with Pillow's DCT-domain `draft` to the smallest scale still >= `resize` on
the shorter side, which skips most of the decode work for large photos.

Ingest validated every blob, so a decode failure here is a bug or a changed file: it raises
`EmbedDecodeError` naming the uid rather than dropping or zero-filling the image.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.curation.pixels import to_rgb, upright
from lvd.curation.vectors import Embedded, write_vectors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    resize: int = 256  # shorter side after resizing (pixels)
    crop: int = 224  # centre crop side; a multiple of the patch size (14 for DINOv2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 64
    device: str = "auto"  # "auto": cuda when available, else cpu; or any torch device string
    dtype: str = "auto"  # autocast dtype; "auto": bfloat16 on cuda, float32 on cpu
    decode_threads: int = 4  # Pillow releases the GIL while decoding and resizing

    def __post_init__(self):
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(
                f"resize={self.resize}, crop={self.crop}: need 1 <= crop <= resize (crop from the resized image)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: use a positive batch size")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose 'auto' or one of {sorted(DTYPES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} / std {self.std}: give three values each, std > 0")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads={self.decode_threads}: use at least 1")


class EmbedDecodeError(ValueError):
    """A blob that Pillow cannot decode; `name` is its uid (or list position)."""

    def __init__(self, name: str, cause: BaseException):
        super().__init__(
            f"cannot decode image {name}: {type(cause).__name__}: {cause} (ingest accepted it; was the blob changed?)"
        )
        self.name = name


class Embedder:
    """One backbone, loaded once; `embed_images` / `embed_blobs` turn bytes into unit vectors.

    `spec` is anything `load_backbone` accepts, or a backbone module (which is then put in eval
    mode, frozen and moved to the device in place).
    """

    def __init__(self, spec: str | Path | torch.nn.Module, cfg: EmbedConfig | None = None):
        self.cfg = cfg or EmbedConfig()
        self.scripted = not isinstance(spec, torch.nn.Module) and is_torchscript(spec)
        if isinstance(spec, torch.nn.Module):
            model = spec
        elif self.scripted:
            # A TorchScript descriptor model (SSCD's sscd_disc_mixup.torchscript.pt, say): a
            # program that maps [B, 3, H, W] pixels to [B, D] descriptors. TorchScript archives
            # load through torch.jit's own restricted unpickler, not Python's pickle.
            model = torch.jit.load(str(spec), map_location="cpu")
        else:
            from lvd.pretrain.models.load import load_backbone

            model = load_backbone(spec)
        if not self.scripted:
            patch = model.patch_embed.proj.kernel_size[0]
            if self.cfg.crop % patch:
                raise ValueError(
                    f"crop={self.cfg.crop} is not a multiple of the backbone's patch size {patch}: use e.g. {max(patch, self.cfg.crop // patch * patch)}"
                )
        self.device = resolve_device(self.cfg.device)
        self.dtype = autocast_dtype(self.cfg.dtype, self.device)
        self.model = model.eval().to(self.device)
        if not self.scripted:
            self.model.requires_grad_(False)
        self.dim = self._script_dim() if self.scripted else int(model.cls_token.shape[-1])
        self._mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.cfg.std).view(1, 3, 1, 1)
        self._pool = ThreadPoolExecutor(self.cfg.decode_threads) if self.cfg.decode_threads > 1 else None

    def embed_images(self, blobs: list[bytes], names: list[str] | None = None) -> np.ndarray:
        """float16 [N, D] L2-normalised CLS vectors of encoded images, in input order.

        `names` (e.g. uids) label a blob in the error raised when it cannot be decoded.
        """
        names = [str(i) for i in range(len(blobs))] if names is None else [str(n) for n in names]
        if len(names) != len(blobs):
            raise ValueError(f"{len(names)} names for {len(blobs)} images")
        out = np.zeros((len(blobs), self.dim), np.float16)
        start = 0
        for x_BCHW in self._prefetched(blobs, names):
            out[start : start + len(x_BCHW)] = self.embed_pixels(x_BCHW)
            start += len(x_BCHW)
        return out

    def _prefetched(self, blobs: list[bytes], names: list[str]):
        """Preprocessed batches in order. Batch i+1 is decoded on a helper thread while the
        caller runs the model on batch i (Pillow and torch release the GIL), so a GPU does not
        wait for the CPU between batches."""
        bs = self.cfg.batch_size
        chunks = [(blobs[s : s + bs], names[s : s + bs]) for s in range(0, len(blobs), bs)]
        if not chunks:
            return
        with ThreadPoolExecutor(1) as prefetch:
            pending = prefetch.submit(self.preprocess, *chunks[0])
            for nxt in chunks[1:] + [None]:
                x_BCHW = pending.result()
                pending = prefetch.submit(self.preprocess, *nxt) if nxt else None
                yield x_BCHW

    def embed_blobs(self, table: pa.Table) -> Embedded:
        """(uids, float16 [N, D]) for a table with `uid` and `data` (an ingest blobs file)."""
        missing = {"uid", "data"} - set(table.column_names)
        if missing:
            raise ValueError(f"embed_blobs needs columns {sorted(missing)} (RUN/ingest/part-NNNNNN.blobs.parquet)")
        uids = table["uid"].to_pylist()
        blobs = table["data"].to_pylist()
        nulls = [u for u, b in zip(uids, blobs) if u is None or b is None]
        if nulls:
            raise ValueError(
                f"{len(nulls)} rows have a null uid or data (first: {nulls[0]!r}); pass accepted blobs only"
            )
        return Embedded(np.array(uids, dtype=object), self.embed_images(blobs, uids))

    def preprocess(self, blobs: list[bytes], names: list[str]) -> torch.Tensor:
        """float32 [B, 3, crop, crop], normalised (on the CPU)."""
        work = list(zip(blobs, names))
        arrays = (
            list(self._pool.map(self._decode, work))
            if self._pool and len(work) > 1
            else [self._decode(w) for w in work]
        )
        x_BHWC = torch.from_numpy(np.stack(arrays))
        x_BCHW = x_BHWC.permute(0, 3, 1, 2).float().div_(255.0)
        return (x_BCHW - self._mean) / self._std

    def _decode(self, item: tuple[bytes, str]) -> np.ndarray:
        data, name = item
        try:
            return resize_crop(decode_rgb(data, self.cfg.resize), self.cfg.resize, self.cfg.crop)
        except Exception as e:  # Pillow raises many types; name the image whatever it was
            raise EmbedDecodeError(name, e) from e

    @torch.inference_mode()
    def embed_pixels(self, x_BCHW: torch.Tensor) -> np.ndarray:
        """float16 [B, D] unit CLS vectors of preprocessed pixels (normalised in float32)."""
        x_BCHW = x_BCHW.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(x_BCHW)
            cls_BD = out if self.scripted else out.cls_BD
        cls_BD = F.normalize(cls_BD.float(), dim=-1)
        return cls_BD.to(torch.float16).cpu().numpy()

    @torch.inference_mode()
    def _script_dim(self) -> int:
        out = self.model(torch.zeros(1, 3, self.cfg.crop, self.cfg.crop, device=self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ValueError(
                f"a TorchScript copy model must map [B, 3, H, W] to [B, D] descriptors; got "
                f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        return int(out.shape[1])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def is_torchscript(spec: str | Path) -> bool:
    """A file that is a TorchScript archive (a zip holding `*/code/` and `*/constants.pkl`)."""
    import zipfile

    path = Path(spec)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def embed_part(
    embedder: Embedder, blobs_path: str | Path, out_dir: str | Path, part_index: int, *, read_rows: int = 1024
) -> int:
    """Embed one ingest blobs file (`RUN/ingest/part-NNNNNN.blobs.parquet`) into the vector store
    part `part_index` of `out_dir`; returns the number of vectors. The per-partition call of an
    embed actor: blobs are read `read_rows` at a time, so only vectors accumulate in memory."""
    uids, vecs = [], []
    for batch in pq.ParquetFile(blobs_path).iter_batches(batch_size=read_rows, columns=["uid", "data"]):
        got = embedder.embed_blobs(pa.Table.from_batches([batch]))
        uids.append(got.uids)
        vecs.append(got.vecs_ND)
    vecs_ND = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float16)
    write_vectors(out_dir, part_index, np.concatenate(uids) if uids else [], vecs_ND)
    return len(vecs_ND)


def decode_rgb(data: bytes, min_side: int) -> Image.Image:
    """Decoded, EXIF-oriented RGB image; JPEGs DCT-downscaled while the shorter side stays >= min_side."""
    return decode_opened(Image.open(io.BytesIO(data)), min_side)


def decode_opened(img: Image.Image, min_side: int) -> Image.Image:
    """`decode_rgb` of an image Pillow has opened (not yet loaded)."""
    if img.format in ("JPEG", "MPO"):
        # draft keeps both sides >= the request; ask for the shorter side only (after rotation
        # the sides swap, but the shorter one is the same).
        w, h = img.size
        scale = min_side / min(w, h)
        img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
    img.load()
    return to_rgb(upright(img))


def resize_crop(img: Image.Image, resize: int, crop: int) -> np.ndarray:
    """uint8 [crop, crop, 3]: shorter side to `resize` (bicubic), then the centre `crop`.

    Sizes and offsets follow torchvision's `Resize(resize)` + `CenterCrop(crop)` (longer side
    truncated, offsets rounded), so that transform is a drop-in reference.
    """
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; a cuda device without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no GPU: use device='auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on cuda, float32 elsewhere; otherwise a key of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
