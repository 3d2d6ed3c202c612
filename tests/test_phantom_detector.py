"""Phantom tiles and NILM cell detectors."""


import numpy as np
import pytest
import torch

from cytosynth.synth.detector import (
    ClassicalCellDetector,
    ClassicalParams,
    FasterRCNNCellDetector,
    build_fasterrcnn,
    load_detector,
    painted_cell_boxes,
    save_detector,
)
from cytosynth.synth.errors import InvalidInputError
from cytosynth.synth.phantom import MAX_CELLS, MIN_CELLS, draw_phantom_tile

PHANTOM_SEEDS = [0, 1, 2, 3, 4]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def count_matches(truth: np.ndarray, found: np.ndarray, iou: float = 0.5) -> int:
    """Greedy one-to-one matching at IoU >= iou, best pairs first."""
    if len(truth) == 0 or len(found) == 0:
        return 0
    m = iou_matrix(truth, found)
    used_t, used_f, n = set(), set(), 0
    for flat in np.argsort(-m, axis=None):
        i, j = divmod(int(flat), m.shape[1])
        if m[i, j] < iou:
            break
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
            n += 1
    return n


def assert_valid_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


@pytest.fixture(scope="module")
def phantoms():
    return [draw_phantom_tile(s) for s in PHANTOM_SEEDS]


# --------------------------------------------------------------------------- phantom


def test_phantom_same_seed_gives_identical_bytes():
    a_img, a_boxes = draw_phantom_tile(7, 256)
    b_img, b_boxes = draw_phantom_tile(7, 256)
    assert a_img.tobytes() == b_img.tobytes()
    assert np.array_equal(a_boxes, b_boxes)
    c_img, _ = draw_phantom_tile(8, 256)
    assert a_img.tobytes() != c_img.tobytes()


def test_phantom_is_a_uint8_rgb_tile_with_cells_inside(phantoms):
    for image, boxes in phantoms:
        assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8
        assert MIN_CELLS <= len(boxes) <= MAX_CELLS
        assert_valid_boxes(boxes, 1024, 1024)
        # Pale background, darker cells: the tile is mostly light but not blank.
        assert 180 < image.mean() < 245 and image.min() < 120


def test_phantom_cells_fit_the_editor_crop(phantoms):
    for _, boxes in phantoms:
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert sides.max() <= 224


def test_phantom_works_at_other_sizes():
    image, boxes = draw_phantom_tile(3, 512)
    assert image.shape == (512, 512, 3)
    assert_valid_boxes(boxes, 512, 512)


# --------------------------------------------------------------------------- classical detector


def test_classical_detector_finds_phantom_cells(phantoms):
    # Measured on seeds 0-4: recall 0.95, precision 0.97 (20 seeds: 0.97 / 0.98). Misses are
    # heavily overlapping pairs merged into one region. Thresholds sit a safe margin below.
    detector = ClassicalCellDetector()
    found = detector.detect([image for image, _ in phantoms])
    matched = sum(count_matches(truth, f) for (_, truth), f in zip(phantoms, found))
    n_truth = sum(len(truth) for _, truth in phantoms)
    n_found = sum(len(f) for f in found)
    for f in found:
        assert_valid_boxes(f, 1024, 1024)
    assert matched / n_truth >= 0.85
    assert matched / n_found >= 0.85


def test_classical_detector_returns_sorted_boxes_deterministically(phantoms):
    image = phantoms[0][0]
    a, b = ClassicalCellDetector().detect([image, image])
    assert np.array_equal(a, b)
    keys = [(y0, x0, y1, x1) for x0, y0, x1, y1 in a.tolist()]
    assert keys == sorted(keys)  # "the i-th detected cell" means the same cell everywhere


def test_classical_detector_finds_nothing_on_blank_or_tiny_specks():
    blank = np.full((256, 256, 3), 235, np.uint8)
    specks = blank.copy()
    specks[100:103, 50:53] = 60  # a 3x3 dark speck is debris, not a cell
    assert [len(b) for b in ClassicalCellDetector().detect([blank, specks])] == [0, 0]


def test_classical_detector_skips_nucleus_sized_debris_in_a_crop_at_full_magnification(phantoms):
    # A 512 crop of a 1024 tile keeps the cells' size in pixels, so the area bound (a fraction of
    # the tile) falls to a quarter and lets nucleus-sized debris through; a cell must also be many
    # times the tile's median nucleus, as squamous cells are and debris is not.
    image, _ = phantoms[2]
    crop = np.ascontiguousarray(image[:512, :512])
    yy, xx = np.mgrid[:512, :512]
    background = ClassicalCellDetector(ClassicalParams(min_nucleus_multiple=0)).detect([crop])[0]
    dots = []
    for cy in range(20, 512, 40):
        for cx in range(20, 512, 40):
            if len(dots) < 6 and not any(x0 - 20 < cx < x1 + 20 and y0 - 20 < cy < y1 + 20 for x0, y0, x1, y1 in background):
                crop[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = (71, 50, 109)  # a dark purple dot, 18 px across
                dots.append((cx, cy))
    assert len(dots) == 6

    def boxed_dots(boxes):
        return sum(any(x0 <= cx < x1 and y0 <= cy < y1 and x1 - x0 < 40 for x0, y0, x1, y1 in boxes) for cx, cy in dots)

    assert boxed_dots(ClassicalCellDetector(ClassicalParams(min_nucleus_multiple=0)).detect([crop])[0]) == 6
    (found,) = ClassicalCellDetector().detect([crop])
    assert boxed_dots(found) == 0
    assert len(found) >= 2  # the cells are still found


def paint_over(tile: np.ndarray, box, glass) -> tuple[np.ndarray, np.ndarray]:
    """``tile`` with ``box`` wiped to glass, as the editor leaves a box, and the pixel grids of the box."""
    x0, y0, x1, y1 = box
    tile = tile.copy()
    tile[y0:y1, x0:x1] = glass
    return tile, np.mgrid[y0:y1, x0:x1]


def test_a_small_cell_painted_in_a_big_box_is_boxed_by_its_own_extent(phantoms):
    image, truth = phantoms[0]
    glass = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    box = (400, 400, 540, 530)
    tile, (yy, xx) = paint_over(image, box, glass)
    cell = (yy - 440) ** 2 + (xx - 430) ** 2 <= 22**2  # an HSIL-sized cell off the box's centre
    tile[box[1]:box[3], box[0]:box[2]][cell] = (150, 120, 170)
    tile[box[1]:box[3], box[0]:box[2]][(yy - 440) ** 2 + (xx - 432) ** 2 <= 12**2] = (60, 40, 100)
    (extent,) = painted_cell_boxes(tile, [box])
    assert np.abs(extent - [408, 418, 453, 463]).max() <= 3, extent  # the disc of radius 22 at (430, 440)


def test_a_koilocyte_whose_halo_cuts_its_nucleus_off_is_boxed_whole(phantoms):
    image, _ = phantoms[0]
    glass = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    box = (400, 400, 540, 530)
    tile, (yy, xx) = paint_over(image, box, glass)
    r = np.hypot(yy - 465, xx - 470)
    ring = (r >= 30) & (r <= 55) & ~((xx > 470) & (np.abs(yy - 465) < 8))  # the halo opens to the glass
    tile[box[1]:box[3], box[0]:box[2]][ring] = (160, 190, 210)
    tile[box[1]:box[3], box[0]:box[2]][r <= 12] = (60, 40, 100)
    (extent,) = painted_cell_boxes(tile, [box])
    assert np.abs(extent - [415, 410, 526, 521]).max() <= 3, extent  # the ring, radius 55 at (470, 465)


def test_a_box_painted_with_glass_alone_keeps_its_own_extent(phantoms):
    image, _ = phantoms[0]
    tile, _ = paint_over(image, (400, 400, 540, 530), np.median(image.reshape(-1, 3), axis=0).astype(np.uint8))
    assert painted_cell_boxes(tile, [(400, 400, 540, 530)]).tolist() == [[400, 400, 540, 530]]


def test_classical_detector_handles_non_square_tiles(phantoms):
    image, truth = phantoms[1]
    crop = np.ascontiguousarray(image[:600, :])
    (found,) = ClassicalCellDetector().detect([crop])
    assert_valid_boxes(found, 1024, 600)
    assert len(found) > 0


def test_detectors_reject_images_that_are_not_uint8_rgb():
    with pytest.raises(InvalidInputError, match="uint8 HxWx3"):
        ClassicalCellDetector().detect([np.zeros((32, 32), np.uint8)])
    with pytest.raises(InvalidInputError, match="uint8 HxWx3"):
        ClassicalCellDetector().detect([np.zeros((32, 32, 3), np.float32)])


def test_load_detector_without_path_is_classical():
    assert isinstance(load_detector(None, "cpu"), ClassicalCellDetector)


# --------------------------------------------------------------------------- Faster R-CNN

# Small input size and proposal counts keep the random-init model fast on CPU.
TINY = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10)


@pytest.fixture(scope="module")
def saved_detector(tmp_path_factory):
    torch.manual_seed(0)
    model = build_fasterrcnn(2, **TINY).eval()
    path = tmp_path_factory.mktemp("det") / "detector.safetensors"
    save_detector(model, path)
    return model, path


def test_fasterrcnn_save_load_round_trip(saved_detector):
    model, path = saved_detector
    loaded = FasterRCNNCellDetector.from_file(path, "cpu", score_threshold=0.0, **TINY)
    expected = model.state_dict()
    got = loaded.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    image = draw_phantom_tile(5, 64)[0]
    original = FasterRCNNCellDetector(model, "cpu", score_threshold=0.0)
    (a,) = original.detect([image])
    b, c = loaded.detect([image, image])
    assert np.array_equal(a, b) and np.array_equal(b, c)
    assert len(a) > 0  # threshold 0 keeps the random model's boxes
    assert_valid_boxes(a, 64, 64)


def test_load_detector_with_path_is_fasterrcnn(saved_detector):
    _, path = saved_detector
    assert isinstance(load_detector(str(path), "cpu", **TINY), FasterRCNNCellDetector)


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(InvalidInputError) as err:
        FasterRCNNCellDetector.from_file(path, "cpu", **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_fasterrcnn_missing_file_is_a_one_line_error(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.safetensors")


def test_fasterrcnn_truncated_file_is_a_one_line_error(saved_detector, tmp_path):
    _, path = saved_detector
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    assert "not a readable safetensors file" in _one_line_error(bad)


def test_fasterrcnn_garbage_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x80\x04not safetensors at all")  # e.g. a pickle: never unpickled
    assert "not a readable safetensors file" in _one_line_error(bad)


def test_fasterrcnn_wrong_state_dict_is_a_one_line_error(saved_detector, tmp_path):
    from safetensors.torch import save_file

    _, path = saved_detector
    # Right architecture, wrong head: weights for 2 classes loaded as 5.
    assert "shape mismatches" in _one_line_error(path, num_classes=5, **TINY)
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(other))
    message = _one_line_error(other, **TINY)
    assert "missing keys" in message and "unexpected keys" in message
