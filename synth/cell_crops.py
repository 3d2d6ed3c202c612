"""Training data of the Abnormal Cell Synthesizer: 256x256 crops centred on annotated abnormal cells.

The paper (Section IV-A) trains the ACS on 256x256 patches centre-cropped around the boxes of
real abnormal cells. A crop is placed exactly as the generator places it when it edits a cell
(`synth.paste.crop_origin`: centred on the box, shifted inside the tile at its edges), so the
model learns on the geometry it is later asked with. Mask, prompt and grounding tokens of a crop
come from `synth.abnormal`, shared with sampling.

Plain numpy over plain data: readers in `storage` hand tiles over as arrays and box lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .abnormal import CELL_PROMPT
from .classes import ABNORMAL_CLASSES
from .errors import InvalidInputError
from .paste import box_in_crop, crop_origin
from .cell_selection import CROP_SIZE, box_fits

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class CellCrop:
    """One training example: a crop, the abnormal cell's box in crop pixels, and its class."""

    image: np.ndarray  # (S, S, 3) uint8
    box: Box
    label: str

    @property
    def prompt(self) -> str:
        return CELL_PROMPT.format(cls=self.label)


@dataclass(frozen=True)
class CropBatch:
    """A batch of crops as arrays, ready for the VAE and the grounding inputs."""

    images: np.ndarray  # (B, S, S, 3) uint8
    boxes: np.ndarray  # (B, 4) int64, crop pixels
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def check_annotation(
    width: int, height: int, boxes: Sequence[Sequence[int]], labels: Sequence[str], where: str, crop_size: int = CROP_SIZE
) -> None:
    """Raise InvalidInputError (one line naming `where`) unless the boxes can be cropped from the tile."""
    if width < crop_size or height < crop_size:
        raise InvalidInputError(f"{where}: tile is {width}x{height}, smaller than the {crop_size}x{crop_size} crop")
    if len(boxes) != len(labels):
        raise InvalidInputError(f"{where}: {len(boxes)} boxes but {len(labels)} labels")
    for box, label in zip(boxes, labels):
        if label not in ABNORMAL_CLASSES:
            raise InvalidInputError(f"{where}: unknown class {label!r} (valid: {', '.join(ABNORMAL_CLASSES)})")
        if len(box) != 4:
            raise InvalidInputError(f"{where}: box {list(box)} is not [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InvalidInputError(f"{where}: box {list(box)} is not inside the {width}x{height} tile")


def grown_to(box: Sequence[int], other: Sequence[int], width: int, height: int) -> Box:
    """`box` grown about its centre to at least the width and height of `other`, no larger than
    the tile, and placed inside it as a crop is (`crop_origin`, per axis)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    w = min(max(x1 - x0, int(other[2] - other[0])), width)
    h = min(max(y1 - y0, int(other[3] - other[1])), height)
    left, _ = crop_origin((x0, y0, x1, y1), width, w)
    _, top = crop_origin((x0, y0, x1, y1), height, h)
    return left, top, left + w, top + h


def cell_crops(
    tile: np.ndarray,
    boxes: Sequence[Sequence[int]],
    labels: Sequence[str],
    crop_size: int = CROP_SIZE,
    where: str = "tile",
    grow_to: Sequence[Sequence[int] | None] | None = None,
) -> list[CellCrop]:
    """One crop per box that fits in a crop (larger boxes are left out: `box_fits`).

    `grow_to` (one box or None per box) trains the ACS on the geometry `generate` asks it with:
    there its box is a detected normal cell's, and a small abnormal cell (ASC-H, HSIL) trained
    only in its own tight box fills a normal cell's box with itself. Each box is grown to the size
    of its `grow_to` box (a normal cell of the same tile: `grown_to`), the crop centred on the
    grown box, which is what the UNet is grounded on and paints; a grown box that no longer fits
    the crop stays as it was.
    """
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise InvalidInputError(f"{where}: expected an HxWx3 uint8 image, got {tile.shape} {tile.dtype}")
    height, width = tile.shape[:2]
    check_annotation(width, height, boxes, labels, where, crop_size)
    crops = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        box = tuple(int(v) for v in box)
        if not box_fits(box, crop_size):
            continue
        other = grow_to[i] if grow_to is not None else None
        if other is not None and box_fits(grown := grown_to(box, other, width, height), crop_size):
            box = grown
        # crop_origin is per axis, so a non-square tile takes x from its width and y from its height.
        left, _ = crop_origin(box, width, crop_size)
        _, top = crop_origin(box, height, crop_size)
        image = np.ascontiguousarray(tile[top : top + crop_size, left : left + crop_size])
        crops.append(CellCrop(image, box_in_crop(box, (left, top)), label))
    return crops


def collate_crops(crops: Sequence[CellCrop]) -> CropBatch:
    return CropBatch(
        images=np.stack([c.image for c in crops]),
        boxes=np.array([c.box for c in crops], dtype=np.int64),
        labels=[c.label for c in crops],
    )


def crop_batches(crops: Iterable[CellCrop], batch_size: int) -> Iterator[CropBatch]:
    """Full batches only: every rank of a distributed step sees the same batch size."""
    batch: list[CellCrop] = []
    for crop in crops:
        batch.append(crop)
        if len(batch) == batch_size:
            yield collate_crops(batch)
            batch = []
