"""Seeds, cell selection and user plans."""

import json

import numpy as np
import pytest
import torch

from cytosynth.synth.classes import ABNORMAL_CLASSES, CATEGORY_IDS
from cytosynth.synth.errors import InvalidInputError
from cytosynth.synth.seeding import rng_for, tile_seed
from cytosynth.synth.cell_selection import MAX_BOX_SIDE, CellEdit, boxes_intersect, select_cells, unedited_boxes
from cytosynth.synth.edit_plan import Plan, load_plan

TILE = 1024


def grid_boxes(n_side: int = 6, side: int = 90, pitch: int = 160) -> np.ndarray:
    """n_side x n_side detected cells on a grid, none overlapping."""
    return np.array(
        [[x, y, x + side, y + side] for y in range(20, 20 + pitch * n_side, pitch) for x in range(20, 20 + pitch * n_side, pitch)],
        np.int64,
    )


def assert_good_edits(edits: list[CellEdit], tile=(TILE, TILE), lo: int = 1, hi: int = 8) -> None:
    assert lo <= len(edits) <= hi
    w, h = tile
    for e in edits:
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 <= MAX_BOX_SIDE and y1 - y0 <= MAX_BOX_SIDE
        assert e.label in ABNORMAL_CLASSES
    for i, a in enumerate(edits):
        for b in edits[i + 1 :]:
            assert not boxes_intersect(a.box, b.box)


# --------------------------------------------------------------------------- classes, seeds


def test_category_ids_are_the_papers_order():
    assert ABNORMAL_CLASSES == ("ASC-US", "ASC-H", "LSIL", "HSIL")
    assert [CATEGORY_IDS[c] for c in ABNORMAL_CLASSES] == [1, 2, 3, 4]


def test_tile_seed_depends_on_job_seed_and_index_only():
    assert tile_seed(42, 17) == tile_seed(42, 17)
    seeds = {tile_seed(42, i) for i in range(1000)} | {tile_seed(43, i) for i in range(1000)}
    assert len(seeds) == 2000
    for s in list(seeds)[:20]:
        assert 0 <= s < 2**63
        torch.Generator().manual_seed(s)  # fits a torch generator


def test_rng_for_gives_independent_streams_per_purpose():
    s = tile_seed(1, 2)
    a = rng_for(s, "selection").integers(0, 2**31, 8)
    assert np.array_equal(a, rng_for(s, "selection").integers(0, 2**31, 8))
    assert not np.array_equal(a, rng_for(s, "phantom").integers(0, 2**31, 8))


# --------------------------------------------------------------------------- random selection


def test_select_cells_picks_1_to_8_non_overlapping_detected_cells():
    boxes = grid_boxes()
    counts = set()
    for seed in range(200):
        edits = select_cells(boxes, np.random.default_rng(seed), TILE)
        assert_good_edits(edits)
        assert {e.box for e in edits} <= {tuple(b) for b in boxes.tolist()}
        keys = [(y0, x0, y1, x1) for x0, y0, x1, y1 in (e.box for e in edits)]
        assert keys == sorted(keys)  # documented order: by (y0, x0, y1, x1)
        counts.add(len(edits))
    assert counts == set(range(1, 9))  # k is drawn over the whole range


def test_cell_edit_rejects_unknown_classes():
    with pytest.raises(InvalidInputError, match="unknown class 'NILM'"):
        CellEdit((0, 0, 10, 10), "NILM")


def test_select_cells_never_picks_overlapping_cells():
    # Pairs of heavily overlapping detections: at most one of each pair may be chosen.
    base = grid_boxes(4)
    boxes = np.concatenate([base, base + [30, 30, 30, 30]])
    for seed in range(50):
        assert_good_edits(select_cells(boxes, np.random.default_rng(seed), TILE, cells=(4, 4)))


def test_select_cells_is_deterministic_for_the_same_rng_seed():
    boxes = grid_boxes()
    a = select_cells(boxes, np.random.default_rng(5), TILE)
    b = select_cells(boxes[::-1].copy(), np.random.default_rng(5), TILE)  # input order irrelevant
    assert a == b


def test_select_cells_respects_class_weights():
    boxes = grid_boxes()
    labels = [e.label for s in range(20) for e in select_cells(boxes, np.random.default_rng(s), TILE, class_weights={"HSIL": 1.0})]
    assert labels and set(labels) == {"HSIL"}
    labels = [
        e.label
        for s in range(100)
        for e in select_cells(boxes, np.random.default_rng(s), TILE, class_weights={"ASC-US": 3, "LSIL": 1})
    ]
    assert set(labels) == {"ASC-US", "LSIL"}
    assert 0.65 < labels.count("ASC-US") / len(labels) < 0.85


def test_select_cells_default_uses_every_class():
    boxes = grid_boxes()
    labels = {e.label for s in range(50) for e in select_cells(boxes, np.random.default_rng(s), TILE)}
    assert labels == set(ABNORMAL_CLASSES)


def test_select_cells_places_boxes_when_detection_finds_none():
    for seed in range(30):
        edits = select_cells(np.zeros((0, 4)), np.random.default_rng(seed), TILE, cells=(3, 5))
        assert_good_edits(edits, lo=3, hi=3)  # tops up to the minimum only
        for e in edits:
            assert 40 <= e.box[2] - e.box[0] <= 110 and 40 <= e.box[3] - e.box[1] <= 110


def test_fallback_boxes_scale_with_the_tile_and_avoid_detected_cells():
    # One detected cell too large for the editor crop: unusable, but placed boxes avoid it.
    huge = np.array([[0, 0, 300, 300]])
    for seed in range(20):
        edits = select_cells(huge, np.random.default_rng(seed), 512, cells=(2, 2))
        assert_good_edits(edits, tile=(512, 512), lo=2, hi=2)
        for e in edits:
            assert not boxes_intersect(e.box, huge[0])
            assert 20 <= e.box[2] - e.box[0] <= 55


def test_select_cells_rejects_bad_settings():
    with pytest.raises(InvalidInputError, match="0 <= min <= max <= 8"):
        select_cells(grid_boxes(), np.random.default_rng(0), TILE, cells=(2, 9))
    with pytest.raises(InvalidInputError, match="unknown class 'NILM'"):
        select_cells(grid_boxes(), np.random.default_rng(0), TILE, class_weights={"NILM": 1.0})
    with pytest.raises(InvalidInputError, match="not all zero"):
        select_cells(grid_boxes(), np.random.default_rng(0), TILE, class_weights={"HSIL": 0.0})


def test_unedited_boxes_are_the_detected_cells_not_edited():
    boxes = grid_boxes(3)
    edits = select_cells(boxes, np.random.default_rng(1), TILE, cells=(2, 2))
    rest = unedited_boxes(boxes, edits)
    edited = {e.box for e in edits}
    assert {tuple(b) for b in rest.tolist()} == {tuple(b) for b in boxes.tolist()} - edited


# --------------------------------------------------------------------------- plans

PLAN = {
    "tiles": {
        "0": [{"box": [10, 20, 110, 140], "label": "ASC-H"}, {"detected": 2, "label": "LSIL"}],
        "3": [],
        "4": [{"detected": 0}],
    },
    "default": "none",
}


def test_plan_happy_path(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    plan = load_plan(path)
    assert plan == load_plan(json.dumps(PLAN)) == load_plan(str(path))
    plan.validate(TILE, num_tiles=5)

    detected = grid_boxes(3)
    rng = np.random.default_rng(0)
    order = sorted(detected.tolist(), key=lambda b: (b[1], b[0]))  # documented: by (y0, x0)
    # Explicit box and detected pick, in plan order; the pick refers to the sorted detections.
    edits = plan.edits_for(0, detected[::-1], rng, TILE)
    assert edits == [CellEdit((10, 20, 110, 140), "ASC-H"), CellEdit(tuple(order[2]), "LSIL")]
    assert plan.edits_for(3, detected, rng, TILE) == []  # listed with no cells
    assert plan.edits_for(1, detected, rng, TILE) == []  # unlisted, default "none"
    (pick,) = plan.edits_for(4, detected, rng, TILE, class_weights={"HSIL": 1})
    assert pick == CellEdit(tuple(order[0]), "HSIL")  # no label: drawn from the weights


def test_plan_default_random_selects_on_unlisted_tiles():
    plan = load_plan('{"tiles": {"0": []}}')
    assert plan.default == "random"
    edits = plan.edits_for(1, grid_boxes(), np.random.default_rng(0), TILE)
    assert_good_edits(edits)


def plan_error(text: str, validate: tuple | None = None) -> str:
    with pytest.raises(InvalidInputError) as err:
        plan = load_plan(text)
        if validate:
            plan.validate(*validate)
    message = str(err.value)
    assert "\n" not in message
    return message


def one_tile(entries) -> str:
    return json.dumps({"tiles": {"7": entries}})


def test_plan_unreadable_json():
    assert "not valid JSON" in plan_error('{"tiles": {"0": [}')


def test_plan_missing_file(tmp_path):
    assert "cannot read" in plan_error(str(tmp_path / "missing.json"))


def test_plan_unknown_class_lists_the_valid_ones():
    message = plan_error(one_tile([{"box": [0, 0, 50, 50], "label": "ASCUS"}]))
    assert "tile 7" in message and "'ASCUS'" in message and "ASC-US, ASC-H, LSIL, HSIL" in message


def test_plan_box_outside_the_tile():
    message = plan_error(one_tile([{"box": [1000, 10, 1100, 100], "label": "HSIL"}]), validate=(TILE, 10))
    assert "tile 7" in message and "outside the 1024x1024 tile" in message
    assert "tile 7" in plan_error(one_tile([{"box": [50, 10, 20, 100]}]))  # x1 <= x0
    assert "tile 7" in plan_error(one_tile([{"box": [-5, 10, 20, 100]}]))


def test_plan_box_too_large_for_the_crop():
    message = plan_error(one_tile([{"box": [0, 0, 300, 100], "label": "HSIL"}]))
    assert "tile 7" in message and "too large" in message and "224" in message


def test_plan_more_than_8_cells_on_a_tile():
    cells = [{"box": [i * 60, 0, i * 60 + 50, 50], "label": "LSIL"} for i in range(9)]
    message = plan_error(one_tile(cells))
    assert "tile 7" in message and "at most 8" in message


def test_plan_overlapping_boxes():
    message = plan_error(one_tile([{"box": [0, 0, 100, 100]}, {"box": [50, 50, 150, 150]}]))
    assert "tile 7" in message and "overlap" in message
    # Touching edges do not overlap: x1 is exclusive.
    load_plan(one_tile([{"box": [0, 0, 100, 100]}, {"box": [100, 0, 200, 100]}]))
    assert "listed twice" in plan_error(one_tile([{"detected": 1}, {"detected": 1}]))


def test_plan_detected_index_out_of_range_at_selection_time():
    plan = load_plan(one_tile([{"detected": 5, "label": "ASC-US"}]))
    plan.validate(TILE, 10)  # fine until we know how many cells the detector found
    with pytest.raises(InvalidInputError) as err:
        plan.edits_for(7, grid_boxes(2), np.random.default_rng(0), TILE)
    assert "tile 7" in str(err.value) and "out of range (4 cells detected)" in str(err.value)


def test_plan_detected_pick_overlapping_an_explicit_box_at_selection_time():
    plan = load_plan(one_tile([{"detected": 0}, {"box": [30, 30, 60, 60]}]))
    with pytest.raises(InvalidInputError, match="tile 7: .* overlap"):
        plan.edits_for(7, grid_boxes(2), np.random.default_rng(0), TILE)


def test_plan_tile_index_out_of_range():
    message = plan_error(one_tile([]), validate=(TILE, 5))
    assert "tile 7" in message and "out of range" in message
    assert "out of range" in plan_error('{"tiles": {"-1": []}}')


def test_plan_structure_errors_are_one_line():
    assert "exactly one of" in plan_error(one_tile([{"label": "HSIL"}]))
    assert "unknown key 'lable'" in plan_error(one_tile([{"box": [0, 0, 9, 9], "lable": "HSIL"}]))
    assert "default must be" in plan_error('{"tiles": {}, "default": "all"}')
    assert "4 integers" in plan_error(one_tile([{"box": [0, 0, 9.5, 9]}]))
