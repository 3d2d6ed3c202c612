"""Image sets: a folder of images, a job output's shards, or shard URLs, on any store.

The one place that decides what a set URL holds (``list_image_set``): every job that reads a set
(FID, model selection, LoRA training, real-to-synthetic generation) lists it here. For metrics a
set is cut into ``ImageUnit`` slices (a run of image files, or one shard) that workers read
independently. Every image comes with a stable id (file name, or ``<shard>/<key>``) that does not
depend on where the set is stored, and, from shards, with its JSON annotation.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import StorageError, describe, redact_url
from .images import UNREADABLE_IMAGE, decode_image
from .objects import get_bytes, list_names
from .reader import read_samples, shard_urls
from .urls import join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
FILES_PER_UNIT = 64  # image files per slice: enough to fill a batch, small enough to balance replicas
_UNREADABLE = (tarfile.TarError, *UNREADABLE_IMAGE)


@dataclass(frozen=True)
class ImageSet:
    """What a set URL holds: ``shards`` (tar URLs, in shard order) or else ``files`` (image URLs,
    sorted by name: image i is the i-th)."""

    url: str
    shards: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def from_shards(self) -> bool:
        return bool(self.shards)


def list_image_set(url: str) -> ImageSet:
    """The set at ``url``: a job output (its committed shards), a shard pattern or ``.tar`` URL (as
    ``shard_urls`` takes it), or a folder of image files. Shards are looked for first: a job output
    also holds preview.png. No images at all is a one-line StorageError."""
    shards = shard_urls(url)
    if shards:
        return ImageSet(url, shards=tuple(shards))
    names = [n for n in list_names(url) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise StorageError(f"no images at {redact_url(url)}: expected image files, a job output with committed shards, or shard URLs")
    return ImageSet(url, files=tuple(join(url, name) for name in names))


def read_image(url: str) -> np.ndarray:
    """One image file as HxWx3 uint8; an unreadable one is a one-line StorageError."""
    data = get_bytes(url)
    try:
        return decode_image(data)
    except _UNREADABLE as err:
        raise StorageError(f"cannot read image {redact_url(url)}: {describe(err)}") from None


@dataclass(frozen=True)
class ImageUnit:
    """A slice of an image set: ``kind`` "files" (``urls`` are images) or "shard" (one tar URL)."""

    kind: str
    urls: tuple[str, ...]

    @property
    def num_images(self) -> int | None:
        """Images in the slice, None for a shard (known only once read)."""
        return len(self.urls) if self.kind == "files" else None


class SetImage(NamedTuple):
    id: str  # file name, or "<shard file name>/<sample key>"
    image: np.ndarray  # HxWx3 uint8
    annotation: dict[str, Any] | None  # the sample's JSON (shards only)


def list_image_units(url: str, *, files_per_unit: int = FILES_PER_UNIT) -> list[ImageUnit]:
    """The slices of the image set at ``url`` (``list_image_set``): a shard each, or runs of files."""
    found = list_image_set(url)
    if found.shards:
        return [ImageUnit("shard", (shard,)) for shard in found.shards]
    files = found.files
    return [ImageUnit("files", files[i : i + files_per_unit]) for i in range(0, len(files), files_per_unit)]


def iter_unit_images(unit: ImageUnit) -> Iterator[SetImage]:
    """The images of one slice in order; an unreadable image or shard is a one-line StorageError."""
    if unit.kind == "files":
        for url in unit.urls:
            yield SetImage(posixpath.basename(url), read_image(url), None)
        return
    (url,) = unit.urls
    shard_name = posixpath.basename(url)
    samples = read_samples(url)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except StorageError:
            raise
        except _UNREADABLE as err:  # a corrupt tar, image or JSON inside the shard
            raise StorageError(f"cannot read shard {redact_url(url)}: {describe(err)}") from None
        yield SetImage(f"{shard_name}/{sample['key']}", sample["image"], sample["json"])
