"""Crop geometry and paste-back: which 256x256 window edits a cell, and how the edit returns.

Only the edit region (the box plus a feathered margin) of a tile changes; every other pixel keeps
the exact bytes of the stage-1 tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = Sequence[int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


def crop_origin(box: Box, tile_size: int, crop_size: int = 256) -> tuple[int, int]:
    """Top-left corner of the crop centred on `box`, shifted to stay inside the tile near edges."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left = min(max(cx - crop_size // 2, 0), tile_size - crop_size)
    top = min(max(cy - crop_size // 2, 0), tile_size - crop_size)
    return left, top


def box_in_crop(box: Box, origin: tuple[int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    left, top = origin
    return x0 - left, y0 - top, x1 - left, y1 - top


def feather_alpha(box: Box, size: int, feather: int) -> np.ndarray:
    """(size, size) float32 weights: 1 inside `box`, falling linearly to exactly 0 `feather` px out."""
    x0, y0, x1, y1 = box
    coords = np.arange(size)
    dx = np.maximum(np.maximum(x0 - coords, coords - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - coords, coords - (y1 - 1)), 0)
    distance = np.maximum(dy[:, None], dx[None, :]).astype(np.float32)
    if feather <= 0:
        return (distance == 0).astype(np.float32)
    return np.clip(1.0 - distance / feather, 0.0, 1.0)


def edit_region(box: Box, tile_size: int, feather: int) -> tuple[int, int, int, int]:
    """The pixels a paste may change: the box grown by the feather margin, clipped to the tile."""
    x0, y0, x1, y1 = box
    grow = max(feather - 1, 0)
    return max(x0 - grow, 0), max(y0 - grow, 0), min(x1 + grow, tile_size), min(y1 + grow, tile_size)


def paste_back(
    tile: np.ndarray, edited_crop: np.ndarray, origin: tuple[int, int], box: Box, feather: int, keep_out: Sequence[Box] = ()
) -> None:
    """Blend `edited_crop` into `tile` in place over the feathered box; pixels with weight 0 are untouched.

    `keep_out` boxes (other edited cells) get weight 0, so one cell's margin never paints over
    its neighbour's edit.
    """
    crop_size = edited_crop.shape[0]
    left, top = origin
    alpha = feather_alpha(box_in_crop(box, origin), crop_size, feather)
    for other in keep_out:
        ox0, oy0, ox1, oy1 = (max(v, 0) for v in box_in_crop(other, origin))
        alpha[oy0:oy1, ox0:ox1] = 0.0
    region = tile[top : top + crop_size, left : left + crop_size]
    blended = alpha[..., None] * edited_crop.astype(np.float32) + (1.0 - alpha[..., None]) * region.astype(np.float32)
    changed = alpha > 0
    region[changed] = np.round(blended[changed]).astype(np.uint8)
