"""preview.png: a valid PNG contact sheet whose boxes show in their class colours."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cytosynth.storage import CLASS_COLORS, ShardWriter, contact_sheet, get_bytes, write_preview

GREY = np.full((128, 128, 3), 200, np.uint8)  # a plain tile: any class colour on it comes from a box


def _sample(boxes, labels, normal_boxes=()):
    ann = {"tile_index": 0, "width": 128, "height": 128, "boxes": boxes, "labels": labels,
           "normal_boxes": list(normal_boxes)}
    return {"key": "000000000", "image": GREY, "json": ann}


def _count(image: Image.Image, color) -> int:
    return int(np.all(np.asarray(image) == color, axis=-1).sum())


def test_each_class_box_adds_pixels_of_its_colour():
    empty = contact_sheet([_sample([], [])], tile_px=128)
    for label, color in CLASS_COLORS.items():
        sheet = contact_sheet([_sample([[20, 20, 100, 90]], [label])], tile_px=128)
        assert sheet.size == empty.size
        # The outline of an 80x70 box at width 2 is over 500 pixels; the legend swatch is in both.
        assert _count(sheet, color) - _count(empty, color) > 500, label


def test_normal_cells_are_drawn_thin_and_grey():
    with_normal = contact_sheet([_sample([], [], normal_boxes=[[10, 10, 50, 50]])], tile_px=128)
    without = contact_sheet([_sample([], [])], tile_px=128)
    grey = (150, 150, 150)
    assert 100 < _count(with_normal, grey) - _count(without, grey) < 200  # a 1-pixel 40x40 outline


def test_sheet_grid_holds_at_most_max_tiles():
    samples = [_sample([], [])] * 10
    four, nine = contact_sheet(samples, max_tiles=4, tile_px=256), contact_sheet(samples, max_tiles=9, tile_px=256)
    # 2x2 vs 3x3: one more column and one more row of 256-pixel thumbnails (plus gutter, caption)
    assert 256 < nine.width - four.width < 300 and 256 < nine.height - four.height < 320


def test_write_preview_writes_a_png_of_the_first_tiles(tmp_path, make_tile):
    out = str(tmp_path / "out")
    writer = ShardWriter(out, 0)
    for i in range(5):
        writer.add(i, *make_tile(i, size=96, boxes=[[10, 10, 60, 60]], labels=["HSIL"]))
    writer.commit()
    url = write_preview(out, max_tiles=4, tile_px=96)
    assert url == out + "/preview.png"
    data = get_bytes(url)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == contact_sheet([_sample([], [])] * 4, tile_px=96).size
    assert _count(image, CLASS_COLORS["HSIL"]) > 4 * 4 * 40  # four tiles, one box each
