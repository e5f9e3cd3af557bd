"""How one source image is stored in a shard: original JPEG bytes, or an RGB JPEG re-encode.

The original bytes are kept when the source is a baseline RGB or grayscale JPEG that needs no
resize; their EXIF orientation stays and readers apply it (`ImageOps.exif_transpose`). Anything
else (PNG, WebP, CMYK JPEG, too large) is decoded, EXIF-transposed, made RGB (alpha on white,
`pixels.to_rgb`), shrunk with Lanczos so its longer side is `max_side`, and saved as JPEG with
its ICC profile. A JPEG to shrink is first downscaled by libjpeg in the DCT (`draft`, to no less
than the target size): about 2x faster than a full decode (benchmarks/shard_write.py).
Sizes are reported as a reader sees them, after EXIF orientation.

Faces (`faces`: boxes from ingest's face detection, in the oriented full-size image): such an
image is always re-encoded, the faces blurred in the pixels that go into the JPEG
(`lvd.curation.faces.blur_faces`: whole 8x8 blocks, every other pixel as decoded), and saved
with 4:4:4 chroma, so outside the blurred blocks it decodes exactly as the same image stored
unblurred with 4:4:4 chroma would.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from lvd.curation.faces import blur_faces, scale_boxes
from lvd.curation.pixels import oriented_size, to_rgb, upright

_KEEPABLE_JPEG_MODES = ("RGB", "L")  # CMYK/YCCK JPEGs decode inconsistently across readers


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    width: int  # as seen after EXIF orientation
    height: int
    original: bool  # the source bytes, untouched


def store_image(
    data: bytes, *, max_side: int | None, quality: int, keep_original: bool = True, faces=()
) -> StoredImage:
    """The JPEG bytes to store for one source image (see module doc); raises on undecodable bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ingest bounded pixels
        with Image.open(io.BytesIO(data)) as img:
            width, height = oriented_size(img)
            too_big = max_side is not None and max(width, height) > max_side
            keepable = img.format == "JPEG" and img.mode in _KEEPABLE_JPEG_MODES and not too_big
            if keep_original and not faces and keepable:
                return StoredImage(data=data, width=width, height=height, original=True)
            target = _fit(width, height, max_side) if too_big else (width, height)
            if img.format == "JPEG" and too_big:  # let libjpeg downscale in the DCT first: much faster
                img.draft("RGB", target if (width, height) == img.size else target[::-1])
            icc = img.info.get("icc_profile")
            rgb = to_rgb(upright(img))  # a broken EXIF block: as stored, as ingest took it
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if faces:
        rgb = blur_faces(rgb, scale_boxes(faces, (width, height), target))
        rgb.save(out, format="JPEG", quality=quality, icc_profile=icc, subsampling=0)
    else:
        rgb.save(out, format="JPEG", quality=quality, icc_profile=icc)
    return StoredImage(data=out.getvalue(), width=target[0], height=target[1], original=False)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
