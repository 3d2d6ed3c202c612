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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .classes import CATEGORY_IDS
from .errors import StorageError, describe
from .jsonio import parse_json
from .loader import _read_coco, split_shards
from .objects import exists, get_bytes
from .reader import decode_sample, open_shard, shard_urls
from .realtiles import read_real_tile
from .retry import retrying
from .shards import marker_url
from .tars import iter_tar_samples
from .urls import filesystem, join

__all__ = ["coco_index", "entries_for_rank", "read_tiles", "shard_index"]

Options = Mapping[str, Any] | None


# --------------------------------------------------------------------------- indexes


def shard_index(source: str | Sequence[str], *, storage_options: Options = None) -> list[dict[str, Any]]:
    """Entries of the tiles with abnormal boxes in a shard set (anything ``shard_urls`` takes)."""
    urls = [source] if isinstance(source, str) else list(source)
    shards = [s for url in urls for s in shard_urls(url, storage_options=storage_options)]
    if not shards:
        raise StorageError(f"no committed shards found at {', '.join(urls)}")
    entries = []
    for shard in shards:
        for row in _shard_annotations(shard, storage_options):
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


def _shard_annotations(shard: str, storage_options: Options) -> list[dict[str, Any]]:
    """The sample annotations of one shard: from its stats JSON (the commit marker, which lists
    every sample's boxes), or, for shards written without one, from the tar's json members."""
    stats = marker_url(shard)
    try:
        if stats and exists(stats, storage_options=storage_options):
            return parse_json(get_bytes(stats, storage_options=storage_options), stats)["samples"]
        with open_shard(shard, storage_options=storage_options) as stream:
            return [
                {"key": raw["__key__"], **parse_json(raw["json"], f"{raw['__key__']}.json")}
                for raw in iter_tar_samples(stream)
                if "json" in raw
            ]
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StorageError(f"cannot read the annotations of shard {shard}: {describe(exc)}") from None


def coco_index(
    annotations_url: str, images_url: str | None = None, *, storage_options: Options = None
) -> list[dict[str, Any]]:
    """Entries of the images with abnormal boxes in a COCO detection file.

    Categories are matched by name (case-insensitive) to ASC-US, ASC-H, LSIL and HSIL; others
    (NILM, bacteria...) and crowd regions are ignored, as the paper filters public sets. Float
    boxes are rounded outwards to whole pixels. Images live at ``images_url`` (default: the JSON's
    folder) + ``file_name``; every one that has boxes must exist and have the size the file says.
    """
    coco = _read_coco(annotations_url, storage_options)
    if images_url is None:
        folder, slash, _ = annotations_url.rpartition("/")
        images_url = folder if slash else "."
    known = {name.upper(): name for name in CATEGORY_IDS}
    names = {c["id"]: known.get(str(c["name"]).upper()) for c in coco["categories"]}
    if not any(names.values()):
        raise StorageError(f"{annotations_url}: no category named {', '.join(CATEGORY_IDS)}")
    cells: dict[Any, list[tuple[list[int], str]]] = {}
    for ann in coco["annotations"]:
        name = names.get(ann["category_id"])
        if name is not None and not ann.get("iscrowd", 0):
            cells.setdefault(ann["image_id"], []).append((_pixel_box(ann, annotations_url), name))
    entries = [
        {
            "source": join(images_url, info["file_name"]),
            "key": None,
            "width": int(info["width"]),
            "height": int(info["height"]),
            "boxes": [box for box, _ in cells[info["id"]]],
            "labels": [name for _, name in cells[info["id"]]],
        }
        for info in coco["images"]
        if info["id"] in cells
    ]
    _check_image_sizes(entries, annotations_url, storage_options)
    return entries


def _pixel_box(ann: Mapping[str, Any], url: str) -> list[int]:
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (TypeError, ValueError):
        raise StorageError(f"{url}: annotation {ann.get('id')} has a malformed bbox {ann['bbox']!r:.60}") from None
    if not (w > 0 and h > 0):
        raise StorageError(f"{url}: annotation {ann.get('id')} has an empty bbox {ann['bbox']!r:.60}")
    return [math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)]


def _check_image_sizes(entries: list[dict[str, Any]], annotations_url: str, storage_options: Options) -> None:
    """Every image exists and has its stated size; only headers are read, a few at a time."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = pool.map(lambda e: image_size(e["source"], storage_options=storage_options), entries)
        for entry, (width, height) in zip(entries, sizes):
            if (width, height) != (entry["width"], entry["height"]):
                raise StorageError(
                    f"{entry['source']} is {width}x{height} but {annotations_url} says {entry['width']}x{entry['height']}"
                )


def image_size(url: str, *, storage_options: Options = None) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (a few KB read, not the pixels)."""
    fs, path = filesystem(url, **(storage_options or {}))

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


def read_tiles(entries: Iterable[dict[str, Any]], *, storage_options: Options = None) -> Iterator[dict[str, Any]]:
    """``{**entry, "image": HxWx3 uint8}`` per entry, in order; a shard's run of entries is one pass
    over the shard, decoding only the samples asked for."""
    for source, group in groupby(entries, key=lambda e: e["source"]):
        run = list(group)
        if run[0]["key"] is not None:
            pairs = _shard_images(source, run, storage_options)
        else:
            pairs = ((e, read_real_tile(source, storage_options=storage_options)) for e in run)
        for entry, image in pairs:
            if image.shape[:2] != (entry["height"], entry["width"]):
                raise StorageError(
                    f"{source}: image {entry['key'] or ''} is {image.shape[1]}x{image.shape[0]}, "
                    f"its annotation says {entry['width']}x{entry['height']}"
                )
            yield {**entry, "image": image}


def _shard_images(shard: str, run: list[dict[str, Any]], storage_options: Options) -> Iterator[tuple[dict, np.ndarray]]:
    """(entry, image) for a shard's entries (in shard order, as the index lists them), decoding no other sample."""
    pending = iter(run)
    entry = next(pending, None)
    with open_shard(shard, storage_options=storage_options) as stream:
        for raw in iter_tar_samples(stream):
            if entry is None:
                return
            if raw["__key__"] == entry["key"]:
                try:
                    image = decode_sample(raw)["image"]
                except (OSError, ValueError) as exc:
                    raise StorageError(f"cannot decode sample {entry['key']} of {shard}: {describe(exc)}") from None
                yield entry, image
                entry = next(pending, None)
    if entry is not None:
        raise StorageError(f"shard {shard} lacks sample {entry['key']} that its stats list")
