"""Shard writing and the commit protocol (docs/design.md §3).

A shard is buffered in memory and committed in two steps: ``shards/NNNNNN.tar`` is written whole,
then ``stats/NNNNNN.json`` (per-shard stats and manifest rows). The .json is the commit marker:
a shard without it does not exist for readers, manifests or resume. The marker records the tar's
size and SHA-256 (``tar_bytes``, ``tar_sha256``) and the job's ``config_sha256``, so a damaged
tar or a shard of another job is found (``storage.integrity``). Markers live in their own
folder so that ``shards/`` holds tars only and any WebDataset reader can take the folder as it is.
``stats_url`` is the one place that says where a marker lives.
"""

from __future__ import annotations

import hashlib
import operator
import re
import time
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .annotations import manifest_row, normalize_annotation, sample_key
from .classes import CLASSES
from .errors import StorageError, redact_url
from .images import IMAGE_FORMATS, check_image, encode_image, image_extension
from .jsonio import json_bytes, parse_json
from .objects import exists, get_bytes, list_names, map_ordered, put_bytes
from .retry import DEFAULT_RETRY, Retry
from .tars import tar_layout
from .urls import join

SHARDS_DIR = "shards"  # the tars, and nothing else
STATS_DIR = "stats"  # the commit markers
# What every reader of a shard marker relies on (totals, manifest, resume and verify checks).
STATS_FIELDS = ("shard", "tiles", "cells", "normal_cells", "samples", "tar_bytes", "tar_sha256")
_MARKER = re.compile(r"^(\d{6,})\.json$")
_TAR = re.compile(r"^(\d{6,})\.tar$")

__all__ = [
    "SHARDS_DIR", "STATS_DIR", "ShardWriter", "check_marker_config", "committed_shards", "iter_shard_stats", "marked_shards",
    "marker_url", "read_marker", "read_shard_stats", "sample_key", "shard_name", "shard_place", "shard_url", "stats_url",
]


def shard_name(index: int) -> str:
    """Shard file stem: its index as 6 digits (``3`` -> ``"000003"``)."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{index:06d}"


def shard_url(out_url: str, index: int) -> str:
    """URL of shard ``index``'s tar under the job output ``out_url``."""
    return join(out_url, SHARDS_DIR, f"{shard_name(index)}.tar")


def stats_url(out_url: str, index: int) -> str:
    """URL of shard ``index``'s stats JSON, the commit marker (the one place that decides where)."""
    return join(out_url, STATS_DIR, f"{shard_name(index)}.json")


def shard_place(tar_url: str) -> tuple[str, int] | None:
    """(job output URL, shard index) of the tar at ``tar_url`` (``OUT/shards/NNNNNN.tar``), or
    None for a tar outside that layout (written by other tools: it has no marker)."""
    folder, _, name = str(tar_url).rstrip("/").rpartition("/")
    out_url, _, shards = folder.rpartition("/")
    match = _TAR.match(name)
    if not (match and shards == SHARDS_DIR and out_url):
        return None
    return out_url, int(match.group(1))


def marker_url(tar_url: str) -> str | None:
    """The commit marker of the shard at ``tar_url``, or None for a tar outside an output's layout."""
    place = shard_place(tar_url)
    return None if place is None else stats_url(*place)


def marker_of(tar_url: str) -> dict[str, Any] | None:
    """The stats JSON (commit marker) of the shard at ``tar_url``, read by the tar's URL, as the
    readers of a shard set have it; None for a tar without one (written by other tools). A marker
    that is there but unreadable is a one-line StorageError."""
    marker = marker_url(tar_url)
    if marker is None or not exists(marker):
        return None
    return read_marker(marker)


def read_marker(url: str) -> dict[str, Any]:
    """The stats JSON at the marker URL ``url`` (one GET); one that is not a JSON object is a
    one-line StorageError."""
    try:
        stats = parse_json(get_bytes(url), redact_url(url))
    except ValueError as err:  # names the marker already
        raise StorageError(str(err)) from None
    if not isinstance(stats, dict):
        raise StorageError(f"{redact_url(url)} is not a cytosynth shard marker")
    return stats


class ShardWriter:
    """Buffers the samples of one shard in memory; ``commit()`` publishes them, or nothing appears.

    Samples are stored sorted by tile index with members ``<key>.json`` then ``<key>.<ext>`` (the
    format's extension: png, jpg or webp),
    so a shard's bytes do not depend on the order (or the worker) in which tiles were added.
    """

    def __init__(
        self,
        out_url: str,
        shard_index: int,
        image_format: str = "png",
        *,
        retry: Retry = DEFAULT_RETRY,
        config_sha256: str | None = None,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
        self.out_url, self.shard_index, self.image_format = out_url, shard_index, image_format
        self._retry = retry
        self.config_sha256 = config_sha256  # the job's identity, recorded in the marker
        self._samples: dict[int, tuple[dict[str, Any], bytes, bytes]] = {}  # tile -> (ann, json, image)
        self._started = time.monotonic()
        self._committed = False
        shard_name(shard_index)  # validates the index before any work is buffered

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, tile_index: int, image: np.ndarray, annotation: Mapping[str, Any]) -> None:
        """Buffer one sample; a ValueError leaves the shard exactly as it was."""
        if self._committed:
            raise RuntimeError(f"shard {self.shard_index} is already committed")
        tile_index = operator.index(tile_index)  # numpy ints welcome, floats refused
        if tile_index in self._samples:
            raise ValueError(f"tile {tile_index} was already added to shard {self.shard_index}")
        check_image(image)
        height, width = image.shape[:2]
        ann = normalize_annotation(annotation, tile_index, width, height)
        # Encode before touching the buffer, so a failure cannot leave half a sample behind.
        self._samples[tile_index] = (ann, json_bytes(ann), encode_image(image, self.image_format))

    def _tar(self) -> tuple[bytes, dict[int, int]]:
        """The shard's tar, and per tile the byte offset of its image in it."""
        tiles = sorted(self._samples)

        def members() -> Iterator[tuple[str, bytes]]:
            for tile_index in tiles:
                _, ann_json, image_bytes = self._samples[tile_index]
                key = sample_key(tile_index)
                yield f"{key}.json", ann_json
                yield f"{key}.{image_extension(self.image_format)}", image_bytes

        tar, offsets = tar_layout(members())
        return tar, dict(zip(tiles, offsets[1::2]))  # each sample is its json, then its image

    def _stats(self, tar: bytes, image_offsets: Mapping[int, int], extra: Mapping[str, Any] | None) -> dict[str, Any]:
        annotations = [self._samples[t][0] for t in sorted(self._samples)]
        cells = Counter(label for ann in annotations for label in ann["labels"])
        computed = {
            "shard": self.shard_index,
            "tiles": len(annotations),
            "cells": {name: cells.get(name, 0) for name in CLASSES},
            "normal_cells": sum(len(a["normal_boxes"]) for a in annotations),
            "image_format": self.image_format,
            "tar_bytes": len(tar),
            "tar_sha256": hashlib.sha256(tar).hexdigest(),
            **({"config_sha256": self.config_sha256} if self.config_sha256 else {}),
            "samples": [
                manifest_row(a, self.shard_index, self.image_format, len(self._samples[a["tile_index"]][2]),
                             image_offsets[a["tile_index"]])
                for a in annotations
            ],
        }
        # Callers add timings, worker ids...; the contract fields above always win.
        return {"seconds": round(time.monotonic() - self._started, 3), **(extra or {}), **computed}

    def commit(self, stats: Mapping[str, Any] | None = None, *, tiles: Iterable[int] | None = None) -> dict[str, Any]:
        """Write the tar whole, then the stats JSON (the commit marker); return the stats.

        ``tiles``: the shard's planned tile indices; the shard is committed only if it holds
        exactly those (RuntimeError otherwise: a lost or stray tile is a bug, never a dataset).
        An empty shard is never committed. Transient storage errors are retried; a permanent one
        raises StorageError and leaves the shard uncommitted (an orphan tar without its .json is
        invisible and is overwritten on resume).
        """
        if self._committed:
            raise RuntimeError(f"shard {self.shard_index} is already committed")
        self._check_tiles(tiles)
        tar, image_offsets = self._tar()
        shard_stats = self._stats(tar, image_offsets, stats)
        put_bytes(shard_url(self.out_url, self.shard_index), tar, retry=self._retry)
        put_bytes(stats_url(self.out_url, self.shard_index), json_bytes(shard_stats), retry=self._retry)
        self._committed = True
        self._samples.clear()  # free the buffered images
        return shard_stats


    def _check_tiles(self, planned: Iterable[int] | None) -> None:
        held = set(self._samples)
        expected = held if planned is None else set(planned)
        if not held or held != expected:
            missing, stray = sorted(expected - held), sorted(held - expected)
            raise RuntimeError(
                f"shard {self.shard_index} not committed: it holds {len(held)} of its {len(expected)} planned tiles"
                + (f" (missing {missing[:5]})" if missing else "") + (f" (not planned {stray[:5]})" if stray else "")
            )


def check_marker_config(stats: Mapping[str, Any], config_sha256: str | None, url: str) -> None:
    """StorageError (one line naming the marker) if the shard was made under another job config.
    A marker without ``config_sha256`` (written by ShardWriter users other than a job) passes."""
    recorded = stats.get("config_sha256")
    if config_sha256 and recorded and recorded != config_sha256:
        raise StorageError(
            f"{redact_url(url)} was committed by a different job config than this output's job.json "
            f"(config {recorded[:12]}, job {config_sha256[:12]}); run `cytosynth verify --repair` or use a new --out"
        )


def committed_shards(out_url: str) -> set[int]:
    """Indices of the committed shards under ``out_url`` (those whose .json marker exists).

    An output written with the old layout (markers beside the tars in ``shards/``) is refused with
    a StorageError rather than taken as empty: a resume would otherwise redo every shard.
    """
    committed = marked_shards(out_url)
    if not committed:
        refuse_old_layout(out_url)
    return committed


def marked_shards(out_url: str) -> set[int]:
    """Indices of the markers in ``out_url``'s ``stats/`` (one listing; no check of the layout)."""
    return {int(m.group(1)) for m in map(_MARKER.match, list_names(join(out_url, STATS_DIR))) if m}


def refuse_old_layout(out_url: str) -> None:
    """StorageError if ``out_url`` holds commit markers in ``shards/`` (the layout before markers
    moved to ``stats/``)."""
    names = list_names(join(out_url, SHARDS_DIR))
    if any(map(_MARKER.match, names)):
        raise StorageError(
            f"{redact_url(out_url)} was written with an older cytosynth layout (commit markers in {SHARDS_DIR}/, "
            f"now {STATS_DIR}/); regenerate it, or move {SHARDS_DIR}/*.json to {STATS_DIR}/"
        )


def read_shard_stats(
    out_url: str,
    index: int,
    *,
    config_sha256: str | None = None,
) -> dict[str, Any]:
    """The stats JSON of committed shard ``index``; with ``config_sha256``, checked to belong to
    that job (``check_marker_config``)."""
    url = stats_url(out_url, index)
    try:
        stats = parse_json(get_bytes(url), redact_url(url))
    except ValueError as err:
        raise StorageError(f"{err}; run `cytosynth verify --repair` or use a new --out") from None
    missing = [f for f in STATS_FIELDS if not isinstance(stats, dict) or f not in stats]
    if missing:
        raise StorageError(
            f"{redact_url(url)} is not a cytosynth shard marker (no {', '.join(missing)}); "
            "run `cytosynth verify --repair` or use a new --out"
        )
    check_marker_config(stats, config_sha256, url)
    return stats


def iter_shard_stats(out_url: str, *, config_sha256: str | None = None) -> Iterator[dict[str, Any]]:
    """Stats of every committed shard, in shard order (each checked against ``config_sha256``), read
    concurrently (``map_ordered``): at 100k shards on S3, one GET after another would take tens of minutes."""
    indices = sorted(committed_shards(out_url))
    yield from map_ordered(
        lambda index: read_shard_stats(out_url, index, config_sha256=config_sha256),
        indices,
    )
