"""The labelled phantom: five classes drawn from Bethesda features, in stain styles, with boxes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cytosynth.synth import ABNORMAL_CLASSES, draw_phantom_tile
from cytosynth.synth.phantom_classes import (
    BASE_STYLES,
    BETHESDA_FEATURES,
    CELL_CLASSES,
    NILM,
    REFERENCE_NUCLEUS_AREA,
    TARGET_STYLE,
    draw_labelled_tile,
)

SCALE = 0.5


@pytest.fixture(scope="module")
def cells():
    """Every cell record of 12 target-style tiles with 4-6 abnormal cells each, by class."""
    by_class = {c: [] for c in CELL_CLASSES}
    for seed in range(12):
        tile = draw_labelled_tile(seed, 512, scale=SCALE, abnormal=(4, 6))
        for cell in tile.cells:
            by_class[cell.label].append(cell)
    assert all(len(v) >= 5 for v in by_class.values()), {k: len(v) for k, v in by_class.items()}
    return by_class


def area_ratio(cell):
    """Nuclear area over the normal intermediate nucleus, both in full-resolution pixels."""
    return cell.nucleus_area / (REFERENCE_NUCLEUS_AREA * SCALE**2)


def test_ascus_nucleus_is_about_2_5_to_3_times_a_normal_intermediate_nucleus(cells):
    ratios = np.array([area_ratio(c) for c in cells["ASC-US"]])
    normal = np.array([area_ratio(c) for c in cells[NILM]])
    # Drawn (rasterised) areas stay within 15% of the Bethesda range the features state.
    assert 2.5 * 0.85 <= ratios.min() and ratios.max() <= 3.0 * 1.15
    assert np.median(ratios) > 2.2 * np.median(normal)


def test_lsil_nucleus_is_enlarged_beyond_ascus_and_often_binucleate(cells):
    lsil = [area_ratio(c) for c in cells["LSIL"]]
    assert min(lsil) >= 3.0 * 0.85
    assert np.median(lsil) > np.median([area_ratio(c) for c in cells["ASC-US"]])
    assert any(c.nuclei == 2 for c in cells["LSIL"])
    assert all(c.nuclei == 1 for cls in ("NILM", "ASC-US", "ASC-H", "HSIL") for c in cells[cls])


def test_asch_and_hsil_are_small_cells_with_high_and_very_high_nc_ratio(cells):
    def nc(cls):
        return np.array([c.nucleus_area / c.cell_area for c in cells[cls]])

    def size(cls):
        return np.median([c.cell_area for c in cells[cls]])

    assert np.median(nc(NILM)) < 0.05
    assert 0.28 * 0.8 <= nc("ASC-H").min() and nc("ASC-H").max() <= 0.42 * 1.2
    assert 0.50 * 0.8 <= nc("HSIL").min() and nc("HSIL").max() <= 0.70 * 1.2
    assert np.median(nc("HSIL")) > np.median(nc("ASC-H")) > 5 * np.median(nc(NILM))
    assert size("HSIL") < size("ASC-H") < size(NILM) / 2


def test_nuclear_darkness_orders_nilm_ascus_hsil_as_the_atlas_grades_hyperchromasia(cells):
    dark = {cls: np.median([c.darkness for c in cells[cls]]) for cls in CELL_CLASSES}
    assert dark[NILM] < dark["ASC-US"] < dark["LSIL"] < dark["HSIL"]
    for cls in CELL_CLASSES:
        lo, hi = BETHESDA_FEATURES[cls].darkness
        assert all(lo <= c.darkness <= hi for c in cells[cls])


def test_the_darkest_pixels_of_an_hsil_box_are_darker_than_those_of_a_nilm_box():
    tile = draw_labelled_tile(3, 512, scale=SCALE, abnormal=(6, 6), classes=("HSIL",))
    def darkest(box):
        x0, y0, x1, y1 = box
        return np.percentile(tile.image[y0:y1, x0:x1].mean(axis=2), 2)

    hsil = [darkest(b) for b, label in zip(tile.boxes, tile.labels) if label == "HSIL"]
    nilm = [darkest(b) for b, label in zip(tile.boxes, tile.labels) if label == NILM]
    assert len(hsil) == 6 and np.median(hsil) < np.median(nilm) - 20


def test_every_box_holds_its_cell_and_lies_in_the_tile():
    for seed in range(4):
        tile = draw_labelled_tile(seed, 256, scale=SCALE, abnormal=(1, 2))
        assert len(tile.boxes) == len(tile.labels) >= 1
        assert (tile.boxes[:, :2] >= 0).all() and (tile.boxes[:, 2:] <= 256).all()
        assert (tile.boxes[:, 2:] > tile.boxes[:, :2]).all()
        background = np.median(tile.image.reshape(-1, 3), axis=0)
        for (x0, y0, x1, y1), cell in zip(tile.boxes, tile.cells):
            inside = tile.image[y0:y1, x0:x1].astype(int)
            stained = (np.abs(inside - background).sum(axis=2) > 30).mean()
            assert stained > 0.3, f"box of a {cell.label} cell is mostly glass"


def test_abnormal_cells_come_in_the_asked_number_and_classes():
    tile = draw_labelled_tile(5, 512, abnormal=(2, 2), classes=("LSIL", "HSIL"))
    boxes, labels = tile.abnormal()
    assert len(boxes) == 2 and set(labels) <= {"LSIL", "HSIL"}
    assert len(tile.normal_boxes()) == len(tile.labels) - 2
    assert not draw_labelled_tile(5, 512, abnormal=(0, 0)).abnormal()[0]
    with pytest.raises(ValueError):
        draw_labelled_tile(5, 512, classes=("NILM",))


def test_same_seed_same_bytes_and_styles_change_the_colours_not_the_cells():
    a, b = draw_labelled_tile(9, 256), draw_labelled_tile(9, 256)
    assert a.image.tobytes() == b.image.tobytes() and a.boxes.tolist() == b.boxes.tolist()
    other = draw_labelled_tile(9, 256, style=BASE_STYLES[0])
    assert other.boxes.tolist() == a.boxes.tolist() and other.labels == a.labels
    mean_colour = lambda t: t.image.reshape(-1, 3).mean(axis=0)  # noqa: E731
    assert np.abs(mean_colour(other) - mean_colour(a)).max() > 3


def test_styles_are_named_in_captions_and_the_target_style_is_not_a_base_style():
    captions = {s.caption for s in BASE_STYLES}
    assert len(captions) == len(BASE_STYLES) >= 5
    assert all(s.name in s.caption for s in BASE_STYLES)
    assert TARGET_STYLE.name not in {s.name for s in BASE_STYLES}
    assert set(ABNORMAL_CLASSES) | {NILM} == set(CELL_CLASSES)


def test_the_nilm_phantom_draws_the_same_bytes_as_before_the_classes_were_added():
    digest = hashlib.sha256()
    for seed, size in [(0, 1024), (1, 512), (7, 256), (3, 64), (11, 333)]:
        image, boxes = draw_phantom_tile(seed, size)
        digest.update(image.tobytes())
        digest.update(boxes.tobytes())
    assert digest.hexdigest() == "b4d2ff3fb777526db52327e9ff81f68a1582e19a6e4c9ecf821607876274777c"
