"""``preview.png``: a contact sheet of the first tiles with their boxes drawn per class."""

from __future__ import annotations

import io
import math
from contextlib import closing
from itertools import islice
from typing import Any, Iterable, Mapping

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .classes import CLASSES, NORMAL_LABEL
from .errors import StorageError, redact_url
from .objects import put_bytes
from .reader import read_samples
from .urls import join

PREVIEW_NAME = "preview.png"
# Saturated hues that stay distinct on pink/purple Pap stain and on the pale slide background.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "ASC-US": (255, 214, 0),  # yellow
    "ASC-H": (255, 120, 0),  # orange
    "LSIL": (0, 190, 255),  # sky blue
    "HSIL": (0, 220, 90),  # green
}
NORMAL_COLOR = (150, 150, 150)
_BACKGROUND = (32, 33, 36)
_TEXT = (232, 234, 237)
_DIM = (154, 160, 166)
_OUTLINE = (0, 0, 0)  # drawn under coloured boxes so they read on light and dark tissue alike
_GUTTER = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _thumbnail(sample: Mapping[str, Any], tile_px: int) -> Image.Image:
    """The tile scaled into a ``tile_px`` square, boxes drawn: NILM thin grey, abnormal per class."""
    tile = Image.fromarray(sample["image"])
    thumb = ImageOps.contain(tile, (tile_px, tile_px), Image.Resampling.LANCZOS)
    scale = thumb.width / tile.width
    ann = sample["json"]
    draw = ImageDraw.Draw(thumb)
    for box in ann.get("normal_boxes", []):
        draw.rectangle([round(v * scale) for v in box], outline=NORMAL_COLOR, width=1)
    width = max(2, round(tile_px / 128))
    for box, label in zip(ann.get("boxes", []), ann.get("labels", [])):
        xy = [round(v * scale) for v in box]
        draw.rectangle([xy[0] - 1, xy[1] - 1, xy[2] + 1, xy[3] + 1], outline=_OUTLINE, width=width + 2)
        draw.rectangle(xy, outline=CLASS_COLORS.get(label, NORMAL_COLOR), width=width)
    cell = Image.new("RGB", (tile_px, tile_px), _BACKGROUND)
    cell.paste(thumb, ((tile_px - thumb.width) // 2, (tile_px - thumb.height) // 2))
    return cell


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, font: Any, size: int) -> None:
    entries = [(name, CLASS_COLORS[name]) for name in CLASSES] + [(NORMAL_LABEL, NORMAL_COLOR)]
    for name, color in entries:
        draw.rectangle([x, y, x + size, y + size], fill=color, outline=_OUTLINE)
        x += size + size // 2
        draw.text((x, y + size // 2), name, fill=_TEXT, font=font, anchor="lm")
        x += round(draw.textlength(name, font=font)) + size


def contact_sheet(samples: Iterable[Mapping[str, Any]], max_tiles: int = 16, tile_px: int = 256) -> Image.Image:
    """A grid of up to ``max_tiles`` thumbnails (``{"key", "image", "json"}`` samples as
    ``read_samples`` yields them), each captioned, under a class-colour legend."""
    chosen = list(islice(samples, max_tiles))
    if not chosen:
        raise ValueError("no samples to preview")
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    text_px = max(10, tile_px // 20)
    font = _font(text_px)
    header, caption = 2 * text_px + 2 * _GUTTER, text_px + _GUTTER
    # Wide enough for the legend even when there are only one or two tiles.
    width = max(cols * (tile_px + _GUTTER) + _GUTTER, 42 * text_px)
    height = header + rows * (tile_px + caption + _GUTTER)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _legend(draw, _GUTTER, _GUTTER + text_px // 2, font, text_px)
    draw.text((width - _GUTTER, _GUTTER + text_px), f"first {len(chosen)} tile{'s' * (len(chosen) != 1)}", fill=_DIM, font=font, anchor="rm")
    for i, sample in enumerate(chosen):
        x = _GUTTER + (i % cols) * (tile_px + _GUTTER)
        y = header + (i // cols) * (tile_px + caption + _GUTTER)
        sheet.paste(_thumbnail(sample, tile_px), (x, y))
        ann = sample["json"]
        label = f"{sample.get('key', ann.get('tile_index'))}  {len(ann.get('boxes', []))} abnormal"
        draw.text((x, y + tile_px + 2), label, fill=_TEXT, font=font)
    return sheet


def write_preview(
    out_url: str,
    max_tiles: int = 16,
    tile_px: int = 256,
) -> str:
    """Write ``preview.png`` under ``out_url`` from the dataset's first committed samples; return its URL."""
    with closing(read_samples(out_url)) as samples:
        first = list(islice(samples, max_tiles))
    if not first:
        raise StorageError(f"no committed shards to preview at {redact_url(out_url)}")
    sheet = contact_sheet(first, max_tiles=max_tiles, tile_px=tile_px)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    url = join(out_url, PREVIEW_NAME)
    put_bytes(url, buf.getvalue())
    return url
