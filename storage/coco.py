"""COCO detection JSON for the abnormal cells (categories fixed: ASC-US 1, ASC-H 2, LSIL 3, HSIL 4)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .annotations import sample_key
from .classes import CATEGORY_IDS, CLASSES, category_id
from .images import image_extension
from .jsonio import json_bytes
from .manifest import shard_rows
from .objects import put_bytes
from .shards import iter_shard_stats
from .urls import join

__all__ = ["CATEGORIES", "CATEGORY_IDS", "to_coco", "write_coco"]

CATEGORIES: list[dict[str, Any]] = [
    {"id": CATEGORY_IDS[name], "name": name, "supercategory": "abnormal"} for name in CLASSES
]
COCO_NAME = "coco.json"


def _annotation(item: Mapping[str, Any]) -> Mapping[str, Any]:
    # Accept read_samples() dicts ({"json": ...}), bare annotations and manifest rows alike.
    return item["json"] if "json" in item and isinstance(item["json"], Mapping) else item


def to_coco(items: Iterable[Mapping[str, Any]], *, image_ext: str = "png") -> dict[str, Any]:
    """COCO dict: one image per sample (id = tile index, file_name = ``<key>.<ext>``, ext from the
    item's ``image_format`` if it has one) and one annotation per abnormal box (bbox xywh, area,
    iscrowd 0)."""
    images, annotations = [], []
    for item in items:
        ann = _annotation(item)
        tile_index = int(ann["tile_index"])
        images.append({
            "id": tile_index,
            "file_name": f"{sample_key(tile_index)}.{image_extension(item.get('image_format', image_ext))}",
            "width": int(ann["width"]),
            "height": int(ann["height"]),
        })
        for (x0, y0, x1, y1), label in zip(ann["boxes"], ann["labels"], strict=True):
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1,  # COCO tools treat id 0 as falsy
                "image_id": tile_index,
                "category_id": category_id(label),
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": 0,
            })
    return {
        "info": {"description": "cytosynth synthetic cervical cytology tiles"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def write_coco(
    out_url: str, path: str | None = None, *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write the COCO JSON of every committed sample (from shard stats, no tar opened) to ``path``
    (default ``<out_url>/coco.json``); return its URL."""
    path = path or join(out_url, COCO_NAME)
    rows = (
        {**row, "image_format": stats["image_format"]}
        for stats in iter_shard_stats(out_url, storage_options=storage_options)
        for row in shard_rows(stats)
    )
    put_bytes(path, json_bytes(to_coco(rows)), storage_options=storage_options)
    return path
