"""Cell selection: which cells of a tile become abnormal, and as which class.

Random selection (the paper: 1-8 detected NILM cells per tile), and the box geometry a user's
plan (`synth/edit_plan.py`) is checked with.

The plan format and its parser: `synth/edit_plan.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .classes import ABNORMAL_CLASSES
from .detector import sort_boxes
from .errors import InvalidInputError

MAX_CELLS_PER_TILE = 8
CROP_SIZE = 256  # the abnormal cell editor works on crops of this size
# finetune-abnormal --box-size: each training cell is painted in its own box ("cell", the paper) or
# in that box grown to a normal cell's size ("normal"), as generate asks (synth.cell_crops.cell_crops).
BOX_SIZES = ("cell", "normal")
CROP_MARGIN = 16  # context kept around the box inside the crop
MAX_BOX_SIDE = CROP_SIZE - 2 * CROP_MARGIN  # 224
# Side range of placed (fallback) boxes at a 1024 tile, scaled with the tile size.
FALLBACK_SIDE = (40, 110)

TileSize = int | tuple[int, int]  # square side, or (width, height)


@dataclass(frozen=True)
class CellEdit:
    """One cell to edit: its box (int xyxy, tile pixels) and its abnormal class."""

    box: tuple[int, int, int, int]
    label: str

    def __post_init__(self) -> None:
        if self.label not in ABNORMAL_CLASSES:
            raise InvalidInputError(f"unknown class {self.label!r} (valid: {', '.join(ABNORMAL_CLASSES)})")
        object.__setattr__(self, "box", tuple(int(v) for v in self.box))
        if len(self.box) != 4:
            raise InvalidInputError(f"a box needs 4 numbers [x0, y0, x1, y1], got {list(self.box)}")


# --------------------------------------------------------------------------- boxes


def tile_width_height(tile_size: TileSize) -> tuple[int, int]:
    if isinstance(tile_size, (tuple, list)):
        return int(tile_size[0]), int(tile_size[1])
    return int(tile_size), int(tile_size)


def boxes_intersect(a, b) -> bool:
    """True if two xyxy boxes share area (touching edges do not count: x1 is exclusive)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def box_inside(box, tile_size: TileSize) -> bool:
    """0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."""
    w, h = tile_width_height(tile_size)
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def box_fits(box, max_side: int) -> bool:
    """No side of the box is longer than `max_side`. Generation asks for MAX_BOX_SIDE (the
    editor's crop less its margin on each side, room for the paste-back feather); training crops
    (`cell_crops`) ask for the whole crop."""
    return box[2] - box[0] <= max_side and box[3] - box[1] <= max_side


def as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 4), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidInputError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------- random selection


def class_probabilities(class_weights: Mapping[str, float] | None) -> np.ndarray:
    """Probabilities over ABNORMAL_CLASSES from weights by name; missing classes weigh 0,
    ``None`` means uniform."""
    if class_weights is None:
        return np.full(len(ABNORMAL_CLASSES), 1.0 / len(ABNORMAL_CLASSES))
    unknown = [k for k in class_weights if k not in ABNORMAL_CLASSES]
    if unknown:
        raise InvalidInputError(
            f"class weights: unknown class {unknown[0]!r} (valid: {', '.join(ABNORMAL_CLASSES)})"
        )
    w = np.array([float(class_weights.get(c, 0.0)) for c in ABNORMAL_CLASSES])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise InvalidInputError("class weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _check_cells(cells: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in cells)
    if not 0 <= lo <= hi <= MAX_CELLS_PER_TILE:
        raise InvalidInputError(f"cells per tile must satisfy 0 <= min <= max <= {MAX_CELLS_PER_TILE}, got {lo}-{hi}")
    return lo, hi


def select_cells(
    normal_boxes: np.ndarray,
    rng: np.random.Generator,
    tile_size: TileSize,
    cells: tuple[int, int] = (1, 8),
    class_weights: Mapping[str, float] | None = None,
) -> list[CellEdit]:
    """Pick cells to edit at random, as in the paper.

    Draws k uniformly in ``cells`` = (min, max), then up to k detected cells in random order
    whose boxes lie inside the tile, fit the 256 crop and do not intersect a cell already
    chosen. Classes are drawn from ``class_weights`` (class name -> weight, missing classes 0;
    default uniform).

    Fallback: the paper edits detected NILM cells only. If fewer than ``min`` suitable cells
    were detected, the missing ones are placed as random cell-sized boxes (sides 40-110 px at
    1024, scaled with the tile) that avoid the chosen cells and, where possible, every
    detected cell, so "min-max cells per tile" holds even where detection finds too few.

    The result is sorted by (y0, x0, y1, x1) and depends only on the inputs and ``rng``'s state.
    """
    w, h = tile_width_height(tile_size)
    lo, hi = _check_cells(cells)
    probs = class_probabilities(class_weights)
    boxes = sort_boxes(as_boxes(normal_boxes))
    suitable = [tuple(int(v) for v in b) for b in boxes if box_inside(b, (w, h)) and box_fits(b, MAX_BOX_SIDE)]

    k = int(rng.integers(lo, hi + 1))
    chosen: list[tuple[int, int, int, int]] = []
    for i in rng.permutation(len(suitable)):
        if len(chosen) == k:
            break
        if not any(boxes_intersect(suitable[i], c) for c in chosen):
            chosen.append(suitable[i])
    if len(chosen) < lo:
        chosen += _place_boxes(rng, lo - len(chosen), (w, h), chosen, [tuple(b) for b in boxes])

    chosen = [tuple(int(v) for v in b) for b in sort_boxes(np.array(chosen, np.int64))]
    labels = rng.choice(len(ABNORMAL_CLASSES), size=len(chosen), p=probs)
    return [CellEdit(box, ABNORMAL_CLASSES[j]) for box, j in zip(chosen, labels)]


def _place_boxes(
    rng: np.random.Generator,
    n: int,
    tile_size: tuple[int, int],
    taken: list[tuple[int, int, int, int]],
    avoid: list[tuple[int, int, int, int]],
    attempts: int = 200,
) -> list[tuple[int, int, int, int]]:
    """n random cell-sized boxes inside the tile, not intersecting ``taken`` nor each other;
    they also avoid ``avoid`` (detected cells) for the first half of the attempts."""
    w, h = tile_size
    scale = min(w, h) / 1024.0
    side_lo = max(4, round(FALLBACK_SIDE[0] * scale))
    side_hi = max(side_lo, round(FALLBACK_SIDE[1] * scale))
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        for attempt in range(attempts):
            bw = min(int(rng.integers(side_lo, side_hi + 1)), w, MAX_BOX_SIDE)
            bh = min(int(rng.integers(side_lo, side_hi + 1)), h, MAX_BOX_SIDE)
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            blockers = taken + placed + (avoid if attempt < attempts // 2 else [])
            if not any(boxes_intersect(box, b) for b in blockers):
                placed.append(box)
                break
        # A tile too full to place a box after all attempts gets fewer cells; at the sizes
        # used (<= 8 boxes of <= 110 px on 1024) this does not happen in practice.
    return placed


def unedited_boxes(normal_boxes: np.ndarray, edits: list[CellEdit], cover: float = 0.5) -> np.ndarray:
    """Normal (NILM) boxes that were not edited: drops every box that an edit box covers for at
    least ``cover`` of its area (an edited detected cell is covered fully). Sorted."""
    boxes = sort_boxes(as_boxes(normal_boxes))
    if not edits or len(boxes) == 0:
        return boxes
    e = np.array([c.box for c in edits], np.int64)
    ix = np.clip(np.minimum(boxes[:, None, 2], e[None, :, 2]) - np.maximum(boxes[:, None, 0], e[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, None, 3], e[None, :, 3]) - np.maximum(boxes[:, None, 1], e[None, :, 1]), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    covered = ((ix * iy) / area[:, None] >= cover).any(axis=1)
    return boxes[~covered]


# --------------------------------------------------------------------------- user plan
