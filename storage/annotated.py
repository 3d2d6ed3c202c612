"""Tiles with annotated abnormal cells, read for training the Abnormal Cell Synthesizer.

Two sources: cytosynth shards (docs/design.md §3; a job output, a ``.tar``, a brace pattern or a
glob) and a COCO detection JSON with its image folder. Either becomes an *index* first, from
metadata only (the shards' stats JSON, or the COCO file plus image headers), so that bad input
fails before any training starts; images are then streamed tile by tile, never copied whole.

An index entry is a plain dict, one per tile holding at least one abnormal box::

    {"source": URL of its shard or image file, "key": sample key in the shard (None for files),
     "width": W, "height": H, "boxes": [[x0, y0, x1, y1], ...] (int pixels), "labels": ["LSIL", ...]}

Errors are one-line StorageErrors naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .classes import CLASSES, NORMAL_LABEL
from .coco import read_coco_images
from .errors import StorageError, describe
from .jsonio import parse_json
from .loader import resolve_shards, split_shards
from .imagesets import read_image
from .reader import decode_sample, open_shard
from .retry import retrying
from .shards import marker_of
from .tars import iter_tar_samples
from .urls import filesystem

__all__ = ["coco_index", "entries_for_rank", "read_tiles", "shard_index"]


# --------------------------------------------------------------------------- indexes


def shard_index(source: str | Sequence[str]) -> list[dict[str, Any]]:
    """Entries of the tiles with abnormal boxes in a shard set (anything ``shard_urls`` takes)."""
    entries = []
    for shard in resolve_shards(source):
        for row in _shard_annotations(shard):
            if row.get("boxes"):
                entries.append({
                    "source": shard,
                    "key": str(row["key"]) if "key" in row else f"{int(row['tile_index']):09d}",
                    "width": int(row["width"]),
                    "height": int(row["height"]),
                    "boxes": [[int(v) for v in box] for box in row["boxes"]],
                    "labels": list(row["labels"]),
                })
    return entries


def _shard_annotations(shard: str) -> list[dict[str, Any]]:
    """The sample annotations of one shard: from its stats JSON (the commit marker, which lists
    every sample's boxes), or, for shards written without one, from the tar's json members."""
    try:
        stats = marker_of(shard)
        if stats is not None:
            return stats["samples"]
        with open_shard(shard) as stream:
            return [
                {"key": raw["__key__"], **parse_json(raw["json"], f"{raw['__key__']}.json")}
                for raw in iter_tar_samples(stream)
                if "json" in raw
            ]
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StorageError(f"cannot read the annotations of shard {shard}: {describe(exc)}") from None


def coco_index(annotations_url: str, images_url: str | None = None) -> list[dict[str, Any]]:
    """Entries of the images with abnormal boxes in a COCO detection file.

    Categories are matched by name (case-insensitive) to ASC-US, ASC-H, LSIL and HSIL, and NILM
    boxes kept apart as the entry's ``normal_boxes``; others (bacteria...) and crowd regions are
    ignored, as the paper filters public sets. Float boxes are rounded outwards to whole pixels.
    Images live at ``images_url`` (default: the JSON's folder) + ``file_name``; every one that has
    abnormal boxes must exist and have the size the file says.
    """
    entries = []
    for image in read_coco_images(annotations_url, images_url, (*CLASSES, NORMAL_LABEL)):
        cells = [(_pixel_box(box, annotations_url), label) for box, label in zip(image.boxes, image.labels)]
        abnormal = [(box, label) for box, label in cells if label != NORMAL_LABEL]
        if abnormal:
            entries.append({
                "source": image.url,
                "key": None,
                "width": image.width,
                "height": image.height,
                "boxes": [box for box, _ in abnormal],
                "labels": [label for _, label in abnormal],
                "normal_boxes": [box for box, label in cells if label == NORMAL_LABEL],
            })
    if not entries:
        raise StorageError(f"{annotations_url}: no annotated abnormal cell (categories are matched by name to {', '.join(CLASSES)})")
    _check_image_sizes(entries, annotations_url)
    return entries


def _pixel_box(box: Sequence[float], url: str) -> list[int]:
    """Rounded outwards to whole pixels: the crop must hold the whole cell. An empty box has no cell."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise StorageError(f"{url}: an annotation has an empty bbox {[x0, y0, x1 - x0, y1 - y0]}")
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


def _check_image_sizes(entries: list[dict[str, Any]], annotations_url: str) -> None:
    """Every image exists and has its stated size; only headers are read, a few at a time."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = pool.map(lambda e: image_size(e["source"]), entries)
        for entry, (width, height) in zip(entries, sizes):
            if (width, height) != (entry["width"], entry["height"]):
                raise StorageError(
                    f"{entry['source']} is {width}x{height} but {annotations_url} says {entry['width']}x{entry['height']}"
                )


def image_size(url: str) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (a few KB read, not the pixels)."""
    fs, path = filesystem(url)

    def read_header() -> tuple[int, int]:
        with fs.open(path, "rb") as f, Image.open(f) as image:
            return image.size

    try:
        return retrying(read_header, url, action="read")
    except UnidentifiedImageError as exc:
        raise StorageError(f"cannot read image {url}: {describe(exc)}") from None


# --------------------------------------------------------------------------- streaming


def entries_for_rank(entries: Sequence[dict[str, Any]], rank: int, world_size: int, *, seed: int, epoch: int) -> list[dict[str, Any]]:
    """This rank's tiles for one epoch, every tile on exactly one rank.

    Sources (shards, image files) are permuted per epoch with the same seed on every rank; whole
    sources go to the ranks round-robin and the remainder (fewer than ``world_size``) is split tile
    by tile, as ``storage.loader`` splits shards. A rank reads only the shards it needs.
    """
    by_source: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_source.setdefault(entry["source"], []).append(entry)
    sources = list(by_source)
    order = np.random.default_rng([seed, epoch]).permutation(len(sources))
    whole, shared = split_shards([sources[i] for i in order], rank, world_size)
    remainder = [e for source in shared for e in by_source[source]]
    return [e for source in whole for e in by_source[source]] + remainder[rank::world_size]


def read_tiles(entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``{**entry, "image": HxWx3 uint8, "normal_boxes": [[x0, y0, x1, y1], ...]}`` per entry, in
    order; a shard's run of entries is one pass over the shard, decoding only the samples asked
    for. Normal (NILM) boxes come from a shard sample's json, or the COCO file's NILM boxes."""
    for source, group in groupby(entries, key=lambda e: e["source"]):
        run = list(group)
        if run[0]["key"] is not None:
            samples = _shard_images(source, run)
        else:
            samples = ((e, read_image(source), e.get("normal_boxes", [])) for e in run)
        for entry, image, normal_boxes in samples:
            if image.shape[:2] != (entry["height"], entry["width"]):
                raise StorageError(
                    f"{source}: image {entry['key'] or ''} is {image.shape[1]}x{image.shape[0]}, "
                    f"its annotation says {entry['width']}x{entry['height']}"
                )
            yield {**entry, "image": image, "normal_boxes": normal_boxes}


def _shard_images(shard: str, run: list[dict[str, Any]]) -> Iterator[tuple[dict, np.ndarray, list]]:
    """(entry, image, normal boxes) for a shard's entries (in shard order, as the index lists
    them), decoding no other sample."""
    pending = iter(run)
    entry = next(pending, None)
    with open_shard(shard) as stream:
        for raw in iter_tar_samples(stream):
            if entry is None:
                return
            if raw["__key__"] == entry["key"]:
                try:
                    sample = decode_sample(raw)
                    normal_boxes = [[int(v) for v in box] for box in sample["json"].get("normal_boxes", [])]
                except (OSError, ValueError, TypeError, AttributeError) as exc:
                    raise StorageError(f"cannot decode sample {entry['key']} of {shard}: {describe(exc)}") from None
                yield entry, sample["image"], normal_boxes
                entry = next(pending, None)
    if entry is not None:
        raise StorageError(f"shard {shard} lacks sample {entry['key']} that its stats list")
