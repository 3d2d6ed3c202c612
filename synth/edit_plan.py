"""The edit plan: a user's file that fixes the locations, number and types of edited cells per tile.

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

from .cell_selection import (
    CROP_SIZE,
    MAX_BOX_SIDE,
    MAX_CELLS_PER_TILE,
    CellEdit,
    TileSize,
    as_boxes,
    box_fits,
    box_inside,
    boxes_intersect,
    class_probabilities,
    select_cells,
    tile_width_height,
)
from .classes import ABNORMAL_CLASSES
from .detector import sort_boxes
from .errors import InvalidInputError

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
        w, h = tile_width_height(tile_size)
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
        w, h = tile_width_height(tile_size)
        probs = class_probabilities(class_weights)
        detected = sort_boxes(as_boxes(normal_boxes))
        where = f"plan: tile {tile_index}"
        edits: list[CellEdit] = []
        for e in entries:
            if e.detected is not None:
                if e.detected >= len(detected):
                    raise InvalidInputError(
                        f"{where}: detected cell {e.detected} out of range ({len(detected)} cells detected)"
                    )
                box = tuple(int(v) for v in detected[e.detected])
                if not box_fits(box, MAX_BOX_SIDE):
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
    if not box_fits(box, MAX_BOX_SIDE):
        raise InvalidInputError(
            f"{where}: box {box} is too large for the {CROP_SIZE}x{CROP_SIZE} editor crop (max side {MAX_BOX_SIDE})"
        )
    return PlanEntry(label=label, box=tuple(box))
