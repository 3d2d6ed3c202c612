"""Real normal tiles for the real-to-synthetic mode: a folder of images or a set of shards."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from .errors import StorageError, describe, redact_url
from .images import UNREADABLE_IMAGE, decode_image
from .objects import get_bytes, list_names
from .reader import read_samples, shard_urls
from .urls import join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


def list_real_tiles(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URLs of the shards at `url` (a job output, .tar, pattern), else of the images in folder
    `url` (sorted: tile i is the i-th). Shards first: a job output also holds preview.png."""
    shards = shard_urls(url, storage_options=storage_options)
    if shards:
        return shards
    names = [n for n in list_names(url, storage_options=storage_options) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise StorageError(f"no real tiles (images or shards) found at {url}")
    return [join(url, n) for n in names]


def read_real_tile(url: str, *, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """One real tile as HxWx3 uint8; an unreadable image is a one-line StorageError."""
    data = get_bytes(url, storage_options=storage_options)
    try:
        return decode_image(data)
    except UNREADABLE_IMAGE as err:
        raise StorageError(f"cannot read real tile {redact_url(url)}: {describe(err)}") from None


def real_tile_size(url: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    data = get_bytes(url, storage_options=storage_options)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in ("I", "F"):
                raise ValueError(f"{image.mode!r} images are not supported; use 8-bit or 16-bit images")
            return image.size
    except UNREADABLE_IMAGE as err:
        raise StorageError(f"cannot read real tile {redact_url(url)}: {describe(err)}") from None


def iter_shard_images(shards: list[str], *, storage_options: Mapping[str, Any] | None = None) -> Iterator[np.ndarray]:
    """Images of a shard set in shard order (tile i is the i-th sample), streamed."""
    for sample in read_samples(shards, storage_options=storage_options):
        yield sample["image"]
