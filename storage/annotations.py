"""The per-sample annotation contract (docs/design.md §3): validation and manifest rows."""

from __future__ import annotations

from typing import Any, Mapping

from .classes import category_id
from .jsonio import to_plain

MANIFEST_FIELDS = (
    "key", "tile_index", "shard", "seed", "boxes", "labels", "category_ids", "source", "width", "height",
    "image_format", "image_bytes", "image_offset",
)


def sample_key(tile_index: int) -> str:
    """The WebDataset ``__key__`` of a tile: its index as 9 digits (``17`` -> ``"000000017"``)."""
    if tile_index < 0:
        raise ValueError(f"tile index must be >= 0, got {tile_index}")
    return f"{tile_index:09d}"


def _check_boxes(boxes: Any, width: int, height: int, field: str) -> None:
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"{field}: box {box} is not [x0, y0, x1, y1]")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
            raise ValueError(f"{field}: box {box} must have integer pixel coordinates")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"{field}: box {box} is not inside the {width}x{height} tile")


def normalize_annotation(annotation: Mapping[str, Any], tile_index: int, width: int, height: int) -> dict[str, Any]:
    """A plain-JSON copy of ``annotation`` checked against its tile; ValueError says what is wrong.

    Fills ``tile_index``, ``width``, ``height`` and ``category_ids`` when absent, so every stored
    annotation carries them.
    """
    ann = to_plain(dict(annotation))
    for field, value in (("tile_index", tile_index), ("width", width), ("height", height)):
        if ann.setdefault(field, value) != value:
            raise ValueError(f"annotation {field}={ann[field]} does not match the sample ({value})")
    boxes, labels = ann.setdefault("boxes", []), ann.setdefault("labels", [])
    if len(boxes) != len(labels):
        raise ValueError(f"annotation has {len(boxes)} boxes but {len(labels)} labels")
    ids = [category_id(label) for label in labels]
    if ann.setdefault("category_ids", ids) != ids:
        raise ValueError(f"annotation category_ids {ann['category_ids']} do not match labels {labels}")
    _check_boxes(boxes, width, height, "boxes")
    _check_boxes(ann.setdefault("normal_boxes", []), width, height, "normal_boxes")
    if "painted_boxes" in ann:  # generate --boxes cell: each box inside the box its cell was painted in
        painted = ann["painted_boxes"]
        _check_boxes(painted, width, height, "painted_boxes")
        if len(painted) != len(boxes) or not all(p[0] <= b[0] and p[1] <= b[1] and b[2] <= p[2] and b[3] <= p[3]
                                                 for b, p in zip(boxes, painted)):
            raise ValueError(f"annotation boxes {boxes} do not lie each in its painted box {painted}")
    return ann


def manifest_row(
    annotation: Mapping[str, Any], shard: int, image_format: str, image_bytes: int, image_offset: int
) -> dict[str, Any]:
    """One manifest row (``MANIFEST_FIELDS``) for a normalized annotation stored in ``shard`` with
    an image of ``image_bytes`` bytes in ``image_format``, starting at byte ``image_offset`` of the tar."""
    return {
        "key": sample_key(annotation["tile_index"]),
        "tile_index": annotation["tile_index"],
        "shard": shard,
        "seed": annotation.get("seed"),
        "boxes": annotation["boxes"],
        "labels": annotation["labels"],
        "category_ids": annotation["category_ids"],
        "source": annotation.get("source"),
        "width": annotation["width"],
        "height": annotation["height"],
        "image_format": image_format,
        "image_bytes": image_bytes,
        "image_offset": image_offset,
    }
