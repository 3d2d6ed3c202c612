"""An edit that paints no cell (`generate --empty-edits`): what counts as holding one, and what
`drop` does with an edit that does not (synth/edit_check.py, synth/pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
from phantom_colours import CYTOPLASM, GLASS, NUCLEUS

from cytosynth.synth import SynthesisSettings, build_synthesizer, draw_phantom_tile, random_bundle, tile_seed
from cytosynth.synth.edit_check import holds_a_nucleus
from cytosynth.synth.errors import InvalidInputError
from cytosynth.synth.pipeline import TileSynthesizer, phantom_source


@pytest.fixture(scope="module")
def normal_cells() -> tuple[np.ndarray, list]:
    """A phantom tile and the boxes of its whole cells (not cut by the tile's edge)."""
    tile, boxes = draw_phantom_tile(7, 1024)
    whole = [b for b in boxes.tolist() if b[0] > 0 and b[1] > 0 and b[2] < 1024 and b[3] < 1024]
    assert len(whole) >= 5
    return tile, whole


def repainted(tile: np.ndarray, box, paint) -> np.ndarray:
    out = tile.copy()
    x0, y0, x1, y1 = box
    paint(out[y0:y1, x0:x1])
    return out


def with_nucleus(radius: float):
    """Cytoplasm with a round nucleus of `radius` px in the middle of the box."""
    def paint(region: np.ndarray) -> None:
        region[:] = CYTOPLASM
        h, w = region.shape[:2]
        y, x = np.ogrid[:h, :w]
        region[(y - h / 2) ** 2 + (x - w / 2) ** 2 <= radius**2] = NUCLEUS
    return paint


def test_a_normal_cell_and_an_enlarged_nucleus_hold_a_cell(normal_cells):
    tile, boxes = normal_cells
    for box in boxes:
        assert holds_a_nucleus(tile, tile, box)  # the cell itself
        assert holds_a_nucleus(tile, repainted(tile, box, with_nucleus(14.0)), box)  # ASC-US: ~3x a normal nucleus


@pytest.mark.parametrize("paint", [
    pytest.param(lambda region: region.__setitem__(slice(None), GLASS), id="glass"),
    pytest.param(lambda region: region.__setitem__(slice(None), CYTOPLASM), id="cytoplasm alone"),
    pytest.param(with_nucleus(2.5), id="a speck"),
])
def test_glass_cytoplasm_alone_or_a_speck_hold_none(normal_cells, paint):
    tile, boxes = normal_cells
    assert not any(holds_a_nucleus(tile, repainted(tile, box, paint), box) for box in boxes)


class GlassOnOddCells:
    """An editor that paints every other cell's box with glass and leaves the rest as they were:
    what an Abnormal Cell Synthesizer that sometimes paints nothing gives."""

    def __call__(self, crops, boxes, labels, seeds):
        out = crops.copy()
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            if k % 2:
                out[k, y0:y1, x0:x1] = GLASS
        return out


@pytest.fixture(scope="module")
def detector():
    return build_synthesizer(random_bundle("tiny").to("cpu"), SynthesisSettings(steps=1), "phantom").detector


def synthesize(detector, empty_edits: str) -> list:
    settings = SynthesisSettings(cells=(4, 4), empty_edits=empty_edits)
    synthesizer = TileSynthesizer(phantom_source(1024), detector, GlassOnOddCells(), settings)
    return synthesizer([0, 1], [tile_seed(0, i) for i in (0, 1)])


def test_drop_leaves_a_cell_its_edit_emptied_as_it_was_and_labels_it_normal(detector):
    kept, dropped = synthesize(detector, "keep"), synthesize(detector, "drop")
    for keep, drop in zip(kept, dropped):
        normal = draw_phantom_tile(keep.seed, 1024)[0]
        emptied = keep.annotation["boxes"][1::2]  # the editor's odd cells, in the order it got them
        assert len(keep.annotation["boxes"]) == 4  # keep: every edit labelled, the empty ones too
        assert drop.annotation["boxes"] == keep.annotation["boxes"][0::2]
        assert drop.annotation["labels"] == keep.annotation["labels"][0::2]
        for x0, y0, x1, y1 in emptied:
            assert [x0, y0, x1, y1] in drop.annotation["normal_boxes"]
            assert np.array_equal(drop.image[y0:y1, x0:x1], normal[y0:y1, x0:x1])
            assert (keep.image[y0:y1, x0:x1] == GLASS).all()
        assert drop.annotation["params"]["empty_edits"] == "drop"


def test_an_unknown_empty_edits_choice_is_one_line_before_anything_runs():
    with pytest.raises(InvalidInputError, match="--empty-edits must be one of keep, drop, got 'skip'"):
        SynthesisSettings(empty_edits="skip").validate()
