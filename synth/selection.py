"""Cell selection: which cells of a tile become abnormal, and as which class.

Random selection (the paper: 1-8 detected NILM cells per tile) or a user plan that fixes the
locations, number and types of edited cells per tile.

Plan format (JSON, a file or the text itself)::

    {
      "tiles": {
        "0": [{"box": [x0, y0, x1, y1], "label": "ASC-H"},
              {"detected": 2, "label": "LSIL"}],
        "5": []
      },
      "default": "random"
    }

- ``tiles`` maps a tile index (as a string, 0-based) to the list of cells to edit on it, at
  most 8. An empty list means "edit nothing on this tile".
- An entry is either ``{"box": [x0, y0, x1, y1]}``, a box in tile pixels (xyxy, x1 and y1
  exclusive, so 0 <= x0 < x1 <= width), or ``{"detected": i}``, the i-th (0-based) NILM cell
  the detector finds on that tile, with the detected cells sorted by (y0, x0, y1, x1).
- ``label`` is one of ASC-US, ASC-H, LSIL, HSIL. It may be left out; the class is then drawn
  from the job's class weights.
- Boxes on a tile must not overlap, and every side must be at most 224 px (the editor works on
  256x256 crops and keeps a 16 px margin around the box).
- ``default`` says what happens on tiles not listed: ``"random"`` (the default) selects cells at
  random as without a plan, ``"none"`` leaves them unedited.

Every problem raises ``InvalidInputError`` with a one-line message naming the tile.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .classes import ABNORMAL_CLASSES
from .detector import sort_boxes
from .errors import InvalidInputError

MAX_CELLS_PER_TILE = 8
CROP_SIZE = 256  # the abnormal cell editor works on crops of this size
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


def _wh(tile_size: TileSize) -> tuple[int, int]:
    if isinstance(tile_size, (tuple, list)):
        return int(tile_size[0]), int(tile_size[1])
    return int(tile_size), int(tile_size)


def boxes_intersect(a, b) -> bool:
    """True if two xyxy boxes share area (touching edges do not count: x1 is exclusive)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def box_inside(box, tile_size: TileSize) -> bool:
    """0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."""
    w, h = _wh(tile_size)
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def fits_crop(box) -> bool:
    """The box fits the editor's 256x256 crop with its margin (sides <= 224)."""
    return box[2] - box[0] <= MAX_BOX_SIDE and box[3] - box[1] <= MAX_BOX_SIDE


def _as_boxes(boxes) -> np.ndarray:
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
    w, h = _wh(tile_size)
    lo, hi = _check_cells(cells)
    probs = class_probabilities(class_weights)
    boxes = sort_boxes(_as_boxes(normal_boxes))
    suitable = [tuple(int(v) for v in b) for b in boxes if box_inside(b, (w, h)) and fits_crop(b)]

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
    boxes = sort_boxes(_as_boxes(normal_boxes))
    if not edits or len(boxes) == 0:
        return boxes
    e = np.array([c.box for c in edits], np.int64)
    ix = np.clip(np.minimum(boxes[:, None, 2], e[None, :, 2]) - np.maximum(boxes[:, None, 0], e[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, None, 3], e[None, :, 3]) - np.maximum(boxes[:, None, 1], e[None, :, 1]), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    covered = ((ix * iy) / area[:, None] >= cover).any(axis=1)
    return boxes[~covered]


# --------------------------------------------------------------------------- user plan

_CLASSES_MSG = ", ".join(ABNORMAL_CLASSES)


@dataclass(frozen=True)
class PlanEntry:
    """One planned cell: an explicit ``box`` or the ``detected``-th detected cell; ``label``
    None means drawn from the class weights."""

    label: str | None
    box: tuple[int, int, int, int] | None = None
    detected: int | None = None


@dataclass(frozen=True)
class Plan:
    """Per-tile cell plans and the policy for tiles not listed ("random" or "none")."""

    tiles: dict[int, tuple[PlanEntry, ...]] = field(default_factory=dict)
    default: str = "random"

    def validate(self, tile_size: TileSize, num_tiles: int) -> None:
        """Check what needs the job's shape: tile indices in [0, num_tiles), boxes inside the
        tile. Run before generating anything so a bad plan fails before any output."""
        w, h = _wh(tile_size)
        for t in sorted(self.tiles):
            if not 0 <= t < num_tiles:
                raise InvalidInputError(f"plan: tile {t}: tile index out of range (the job has tiles 0-{num_tiles - 1})")
            for e in self.tiles[t]:
                if e.box is not None and not box_inside(e.box, (w, h)):
                    raise InvalidInputError(f"plan: tile {t}: box {list(e.box)} is outside the {w}x{h} tile")

    def edits_for(
        self,
        tile_index: int,
        normal_boxes: np.ndarray,
        rng: np.random.Generator,
        tile_size: TileSize,
        cells: tuple[int, int] = (1, 8),
        class_weights: Mapping[str, float] | None = None,
    ) -> list[CellEdit]:
        """The edits of one tile: the plan's entries (in plan order) if the tile is listed,
        else random selection (``default: "random"``) or nothing (``"none"``)."""
        entries = self.tiles.get(tile_index)
        if entries is None:
            if self.default == "none":
                return []
            return select_cells(normal_boxes, rng, tile_size, cells, class_weights)
        w, h = _wh(tile_size)
        probs = class_probabilities(class_weights)
        detected = sort_boxes(_as_boxes(normal_boxes))
        where = f"plan: tile {tile_index}"
        edits: list[CellEdit] = []
        for e in entries:
            if e.detected is not None:
                if e.detected >= len(detected):
                    raise InvalidInputError(
                        f"{where}: detected cell {e.detected} out of range ({len(detected)} cells detected)"
                    )
                box = tuple(int(v) for v in detected[e.detected])
                if not fits_crop(box):
                    raise InvalidInputError(
                        f"{where}: detected cell {e.detected} box {list(box)} is too large for the "
                        f"{CROP_SIZE}x{CROP_SIZE} editor crop (max side {MAX_BOX_SIDE})"
                    )
            else:
                box = e.box
                if not box_inside(box, (w, h)):
                    raise InvalidInputError(f"{where}: box {list(box)} is outside the {w}x{h} tile")
            label = e.label or ABNORMAL_CLASSES[int(rng.choice(len(ABNORMAL_CLASSES), p=probs))]
            edits.append(CellEdit(box, label))
        _check_no_overlap([c.box for c in edits], where)
        return edits


def _check_no_overlap(boxes: list, where: str) -> None:
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if boxes_intersect(boxes[i], boxes[j]):
                raise InvalidInputError(f"{where}: boxes {list(boxes[i])} and {list(boxes[j])} overlap")


def plan_from_json(text: str) -> Plan:
    """Parse a plan from its JSON text (never taken as a path)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"plan: not valid JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidInputError(f"plan: not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise InvalidInputError("plan: not valid JSON: nested too deeply") from None
    if not isinstance(data, Mapping):
        raise InvalidInputError("plan: expected a JSON object with a \"tiles\" object")
    return load_plan(data)


def load_plan(text_or_path: str | os.PathLike | Mapping) -> Plan:
    """Parse a plan from JSON text, a path to a JSON file, or an already parsed dict.

    Checks everything that needs no tile size (see ``Plan.validate`` for the rest)."""
    if isinstance(text_or_path, Mapping):
        data = text_or_path
    else:
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            path = os.fspath(text_or_path)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInputError(f"plan: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        else:
            text = str(text_or_path)
        return plan_from_json(text)
    if not isinstance(data, Mapping):
        raise InvalidInputError("plan: expected a JSON object with a \"tiles\" object")
    extra = sorted(set(data) - {"tiles", "default"})
    if extra:
        raise InvalidInputError(f"plan: unknown key {extra[0]!r} (expected \"tiles\" and \"default\")")
    default = data.get("default", "random")
    if default not in ("random", "none"):
        raise InvalidInputError(f"plan: default must be \"random\" or \"none\", got {default!r}")
    raw_tiles = data.get("tiles", {})
    if not isinstance(raw_tiles, Mapping):
        raise InvalidInputError("plan: \"tiles\" must be an object mapping tile index to a list of cells")
    tiles: dict[int, tuple[PlanEntry, ...]] = {}
    for key, raw in raw_tiles.items():
        t = _tile_index(key)
        if t in tiles:
            raise InvalidInputError(f"plan: tile {t} is listed twice")
        tiles[t] = _parse_tile(t, raw)
    return Plan(tiles=tiles, default=default)


def _tile_index(key) -> int:
    s = str(key).strip()
    # ASCII digits only ("²".isdigit() is True), and few enough to be a tile index.
    if not (s.isascii() and s.isdigit() and len(s) <= 18):
        shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
        raise InvalidInputError(f"plan: tile {shown}: tile index out of range (must be an integer >= 0, below 10^18)")
    return int(s)


def _parse_tile(t: int, raw) -> tuple[PlanEntry, ...]:
    where = f"plan: tile {t}"
    if not isinstance(raw, list):
        raise InvalidInputError(f"{where}: expected a list of cells")
    if len(raw) > MAX_CELLS_PER_TILE:
        raise InvalidInputError(f"{where}: {len(raw)} cells, at most {MAX_CELLS_PER_TILE} per tile")
    entries = []
    for i, item in enumerate(raw):
        entries.append(_parse_entry(f"{where}: cell {i}", item))
    seen: set[int] = set()
    for e in entries:
        if e.detected is not None:
            if e.detected in seen:
                raise InvalidInputError(f"{where}: detected cell {e.detected} is listed twice")
            seen.add(e.detected)
    _check_no_overlap([e.box for e in entries if e.box is not None], where)
    return tuple(entries)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(where: str, item) -> PlanEntry:
    if not isinstance(item, Mapping):
        raise InvalidInputError(f"{where}: expected an object like {{\"box\": [x0, y0, x1, y1], \"label\": \"LSIL\"}}")
    extra = sorted(set(item) - {"box", "detected", "label"})
    if extra:
        raise InvalidInputError(f"{where}: unknown key {extra[0]!r} (expected \"box\" or \"detected\", and \"label\")")
    if ("box" in item) == ("detected" in item):
        raise InvalidInputError(f"{where}: give exactly one of \"box\" or \"detected\"")
    label = item.get("label")
    if label is not None and label not in ABNORMAL_CLASSES:
        raise InvalidInputError(f"{where}: unknown class {label!r} (valid: {_CLASSES_MSG})")
    if "detected" in item:
        d = item["detected"]
        if not _is_int(d) or d < 0:
            raise InvalidInputError(f"{where}: \"detected\" must be an integer >= 0, got {d!r}")
        return PlanEntry(label=label, detected=d)
    box = item["box"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)):
        raise InvalidInputError(f"{where}: box must be 4 integers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1) or min(box) < 0:
        raise InvalidInputError(f"{where}: box {box} is outside the tile (need 0 <= x0 < x1, 0 <= y0 < y1)")
    if not fits_crop(box):
        raise InvalidInputError(
            f"{where}: box {box} is too large for the {CROP_SIZE}x{CROP_SIZE} editor crop (max side {MAX_BOX_SIDE})"
        )
    return PlanEntry(label=label, box=tuple(box))
