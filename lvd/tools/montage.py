"""A PNG of a query and its nearest images: query on the left, then the k hits in rank order,
each tile letterboxed on grey with `#rank  cosine` and the image id written under it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lvd.tools.images import open_image
from lvd.tools.search import Hit

BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (128, 128, 128)
CAPTION = 34  # pixels under each tile: two lines of text
GAP = 6


def montage_size(k: int, tile: int) -> tuple[int, int]:
    """(width, height) of a montage with `k` hits; a wider gap sets the query apart."""
    return GAP + (tile + GAP) * (k + 1) + 2 * GAP, GAP + tile + CAPTION


def fit_tile(img: Image.Image, tile: int) -> Image.Image:
    """`img` shrunk to fit `tile` x `tile` (aspect kept), centred on grey."""
    img = img.convert("RGB")
    img.thumbnail((tile, tile), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (tile, tile), TILE_BACKGROUND)
    canvas.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return canvas


def _neighbour(hit: Hit, tile: int) -> Image.Image:
    try:
        return fit_tile(open_image(hit.path, min_side=tile), tile)
    except Exception as e:  # noqa: BLE001 -- a moved or deleted file: say so in the tile, keep the montage
        canvas = Image.new("RGB", (tile, tile), TILE_BACKGROUND)
        ImageDraw.Draw(canvas).text((4, 4), f"unreadable\n{type(e).__name__}", fill=(255, 255, 255))
        return canvas


def write_montage(
    query: Image.Image, hits: list[Hit], out: str | Path, *, tile: int = 160, query_label: str = "query"
) -> Path:
    """Write the montage of `query` and `hits` (best first) to `out` (PNG); returns the path."""
    font = ImageFont.load_default()
    width, height = montage_size(len(hits), tile)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    x = GAP
    sheet.paste(fit_tile(query, tile), (x, GAP))
    _caption(draw, x, tile, query_label, "", font)
    x += tile + 3 * GAP
    for hit in hits:
        sheet.paste(_neighbour(hit, tile), (x, GAP))
        _caption(draw, x, tile, f"#{hit.rank}  cos {hit.score:.3f}", hit.id, font)
        x += tile + GAP
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _caption(draw: ImageDraw.ImageDraw, x: int, tile: int, line1: str, line2: str, font) -> None:
    y = GAP + tile + 3
    draw.text((x, y), line1, fill=(0, 0, 0), font=font)
    # the id may be long (a relative path, a uid): keep its end, which names the file
    chars = max(4, tile // 6)
    draw.text(
        (x, y + 15), line2 if len(line2) <= chars else "..." + line2[-(chars - 3) :], fill=(80, 80, 80), font=font
    )
