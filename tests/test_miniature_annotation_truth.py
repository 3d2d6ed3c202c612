"""The miniature's annotation-truth measure (bench/mini_measure.py): a box labelled with an abnormal
class holds a cell only if it holds a nucleus. An edit that paints blank glass, cytoplasm alone or
a speck is a box that lies, whatever pixels it changed."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from phantom_colours import CYTOPLASM, GLASS, LYMPHOCYTE

from cytosynth.synth.phantom_classes import CELL_CLASSES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import mini_data  # noqa: E402
from mini_measure import boxes_holding_a_nucleus, largest_nucleus  # noqa: E402


@pytest.fixture(scope="module")
def real_tiles() -> list:
    return mini_data.abnormal_tiles("test_a", 8)


def as_samples(tiles: list) -> list[dict]:
    return [{"image": t.image, "boxes": t.boxes.tolist(), "labels": t.labels} for t in tiles]


def test_every_real_abnormal_cell_holds_a_nucleus(real_tiles):
    counts = boxes_holding_a_nucleus(as_samples(real_tiles))
    assert set(counts) == set(CELL_CLASSES[1:])
    assert sum(c["boxes"] for c in counts.values()) >= 8
    assert all(c["with_nucleus"] == c["boxes"] for c in counts.values()), counts


def painted_over(tiles: list, paint) -> list[dict]:
    """The tiles with every abnormal box repainted by `paint(region)`, as a failed edit leaves it."""
    samples = as_samples(tiles)
    for sample in samples:
        sample["image"] = image = sample["image"].copy()
        for (x0, y0, x1, y1), label in zip(sample["boxes"], sample["labels"]):
            if label != "NILM":
                paint(image[y0:y1, x0:x1])
    return samples


def lymphocyte_on_glass(region: np.ndarray) -> None:
    """Glass with a lymphocyte (radius 5 px, the phantom's largest) in the middle."""
    region[:] = GLASS
    h, w = region.shape[:2]
    y, x = np.ogrid[:h, :w]
    region[(y - h // 2) ** 2 + (x - w // 2) ** 2 <= 25] = LYMPHOCYTE


@pytest.mark.parametrize("paint", [
    pytest.param(lambda region: region.__setitem__(slice(None), GLASS), id="blank glass"),
    pytest.param(lambda region: region.__setitem__(slice(None), CYTOPLASM), id="cytoplasm without a nucleus"),
    pytest.param(lymphocyte_on_glass, id="a lymphocyte"),
])
def test_a_box_of_glass_cytoplasm_or_a_lymphocyte_holds_none(real_tiles, paint):
    counts = boxes_holding_a_nucleus(painted_over(real_tiles, paint))
    assert sum(c["boxes"] for c in counts.values()) >= 8
    assert all(c["with_nucleus"] == 0 for c in counts.values()), counts


def test_the_nucleus_found_is_the_largest_dark_region_in_the_box():
    image = np.broadcast_to(GLASS, (64, 64, 3)).copy()
    image[10:20, 10:20] = LYMPHOCYTE  # 100 px
    image[30:36, 30:36] = LYMPHOCYTE  # 36 px
    assert largest_nucleus(image, (0, 0, 64, 64)) == 100
    assert largest_nucleus(image, (25, 25, 64, 64)) == 36
    assert largest_nucleus(image, (40, 40, 64, 64)) == 0
