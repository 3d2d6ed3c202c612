"""COCO detection JSON, both ways: written from the shard stats (``write_coco``) or exported with
the images beside it (``export_coco``, what ``cytosynth export-coco`` runs) so ``file_name``
resolves; and read (``read_coco_images``), the one place a user's COCO set is parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .annotations import sample_key
from .classes import CATEGORY_IDS, CLASSES, NORMAL_LABEL, label_categories, labelled_boxes
from .errors import StorageError, describe
from .images import image_extension
from .jsonio import json_bytes, parse_json
from .manifest import shard_rows
from .objects import get_bytes, put_bytes
from .reader import IMAGE_EXTENSIONS, committed_shard_urls, open_shard
from .shards import iter_shard_stats
from .tars import iter_tar_samples
from .urls import join

__all__ = [
    "ANNOTATIONS_NAME", "CATEGORIES", "CATEGORY_IDS", "CocoImage", "coco_categories", "export_coco", "read_coco_images",
    "to_coco", "write_coco",
]

CATEGORIES: list[dict[str, Any]] = [
    {"id": CATEGORY_IDS[name], "name": name, "supercategory": "abnormal"} for name in CLASSES
]
COCO_NAME = "coco.json"
ANNOTATIONS_NAME = "annotations.json"
_INFO = {"description": "cytosynth synthetic cervical cytology tiles", "version": "1.0", "contributor": "cytosynth"}


def coco_categories(labels: str = "abnormal") -> list[dict[str, Any]]:
    """COCO ``categories`` of a label set (``storage.classes.LABEL_SETS``)."""
    return [
        {"id": i, "name": name, "supercategory": "normal" if name == NORMAL_LABEL else "abnormal"}
        for i, name in label_categories(labels).items()
    ]


def _annotation(item: Mapping[str, Any]) -> Mapping[str, Any]:
    # Accept read_samples() dicts ({"json": ...}), bare annotations and manifest rows alike.
    return item["json"] if "json" in item and isinstance(item["json"], Mapping) else item


def to_coco(items: Iterable[Mapping[str, Any]], *, image_ext: str = "png", labels: str = "abnormal") -> dict[str, Any]:
    """COCO dict: one image per sample (id = tile index, file_name = ``<key>.<ext>``, ext from the
    item's ``image_format`` if it has one) and one annotation per box of the label set (bbox xywh,
    area, iscrowd 0); ``labels="all"`` adds the NILM boxes (``normal_boxes``) as category 5."""
    categories = coco_categories(labels)
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
        for (x0, y0, x1, y1), category in zip(*labelled_boxes(ann, labels), strict=True):
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1,  # COCO tools treat id 0 as falsy
                "image_id": tile_index,
                "category_id": category,
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": 0,
            })
    return {"info": _INFO, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_coco(out_url: str, path: str | None = None) -> str:
    """Write the COCO JSON of every committed sample (from shard stats, no tar opened) to ``path``
    (default ``<out_url>/coco.json``); return its URL. Its ``file_name``s are the shard member
    names; ``export_coco`` writes the image files too."""
    path = path or join(out_url, COCO_NAME)
    rows = (
        {**row, "image_format": stats["image_format"]}
        for stats in iter_shard_stats(out_url)
        for row in shard_rows(stats)
    )
    put_bytes(path, json_bytes(to_coco(rows)))
    return path


def export_coco(out_url: str, images_url: str, labels: str = "abnormal") -> str:
    """Extract every committed sample of the output ``out_url`` (local or any fsspec URL) into the
    folder ``images_url`` (``<key>.<ext>``, the shard's bytes as they are) and write
    ``images_url/annotations.json`` last, its ``file_name``s relative to that folder; return its URL.

    Bad input is a one-line StorageError naming the URL.
    """
    label_categories(labels)  # an unknown label set fails before anything is written
    items = []
    for shard in committed_shard_urls(out_url):
        for key, ext, image, annotation in _shard_members(shard):
            put_bytes(join(images_url, f"{key}.{ext}"), image)
            items.append({**annotation, "image_format": ext})
    url = join(images_url, ANNOTATIONS_NAME)
    put_bytes(url, json_bytes(to_coco(items, labels=labels), indent=1))
    return url


def _shard_members(shard: str):
    """(key, image extension, image bytes, annotation) per sample of one shard, streamed."""
    try:
        with open_shard(shard) as stream:
            for raw in iter_tar_samples(stream):
                key = str(raw["__key__"])
                ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
                if ext is None or "json" not in raw:
                    raise ValueError(f"sample {key} lacks an image or its json")
                yield key, ext, raw[ext], parse_json(raw["json"], f"{key}.json")
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read shard {shard}: {describe(exc)}") from None


@dataclass
class CocoImage:
    """One image of a COCO set: its URL, id and stated size, and its cells of the asked classes
    (boxes xyxy in float pixels, as the file gives them)."""

    url: str
    id: Any
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def read_coco_images(
    annotations_url: str,
    images_url: str | None = None,
    classes: Sequence[str] = (*CLASSES, NORMAL_LABEL),
) -> list[CocoImage]:
    """Every image of a COCO detection file, in the file's order, with its cells of ``classes``.

    Categories are matched by name, case-insensitively; others (bacteria, other cell types) are
    ignored, as the paper filters public sets, and so are crowd regions. Images live at
    ``images_url`` (default: the JSON's folder) + ``file_name``. A missing or malformed file, or
    a malformed bbox, is a one-line StorageError naming it; no image is read here.
    """
    coco = _read_coco_json(annotations_url)
    if images_url is None:
        folder, slash, _ = annotations_url.rpartition("/")
        images_url = folder if slash else "."
    known = {name.upper(): name for name in classes}
    names = {c["id"]: known.get(str(c["name"]).upper()) for c in coco["categories"]}
    images = {
        info["id"]: CocoImage(join(images_url, info["file_name"]), info["id"], int(info["width"]), int(info["height"]))
        for info in coco["images"]
    }
    for ann in coco["annotations"]:
        name = names.get(ann["category_id"])
        image = images.get(ann["image_id"])
        if name is None or image is None or ann.get("iscrowd", 0):
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (TypeError, ValueError):
            raise StorageError(f"{annotations_url}: annotation {ann.get('id')} has a malformed bbox {ann['bbox']!r:.60}") from None
        image.boxes.append([x, y, x + w, y + h])
        image.labels.append(name)
    return list(images.values())


def _read_coco_json(url: str) -> dict[str, Any]:
    try:
        coco = parse_json(get_bytes(url), url)
        for name in ("images", "annotations", "categories"):
            if not isinstance(coco.get(name), list):
                raise ValueError(f"no {name!r} list")
        _require(coco["images"], ("id", "file_name", "width", "height"), "image")
        _require(coco["annotations"], ("image_id", "category_id", "bbox"), "annotation")
        _require(coco["categories"], ("id", "name"), "category")
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"{url} is not a COCO detection file: {describe(exc)}") from None
    return coco


def _require(items: list[Any], keys: tuple[str, ...], what: str) -> None:
    for item in items:
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{what} {item!r:.80} lacks {', '.join(missing)}")
