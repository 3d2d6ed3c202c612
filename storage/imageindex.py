"""An index of an image set: where each image's bytes are and its size, made once, read anywhere.

A set of a million real tiles must not be decoded, downloaded or skipped through to find tile i.
``index_image_set`` lists the set once (``imagesets.list_image_set``) and records, per image, its
URL, its byte range inside a shard's tar (None for an image file) and its width and height. A
shard of a cytosynth output says all of that in its commit marker's sample rows (one GET, no tar
read; the output's ``shards/`` listing vouches for the tar's size); any other shard, or one whose
marker was written before the rows recorded image offsets, is indexed from its headers: the tar's
read with seeks over the data, each image's own. An image file's header is read by a partial
read. ``read_indexed_image`` then reads image i by one ranged read.

The index is a Parquet file (``write_image_index``, ``read_image_index``), so a job writes it
once and every process that reads the tiles takes it as it is, without listing the set again.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .errors import StorageError, describe, redact_url
from .images import UNREADABLE_IMAGE, decode_image
from .imagesets import list_image_set, read_image
from .integrity import shard_problem, tar_sizes
from .manifest import shard_rows
from .objects import get_bytes, get_range, map_ordered, put_bytes
from .reader import IMAGE_EXTENSIONS
from .retry import retrying
from .shards import marked_shards, read_marker, shard_place, stats_url
from .tars import split_member
from .urls import filesystem, join

INDEX_FORMAT = "cytosynth-image-index/1"
REAL_INDEX_NAME = "real_index.parquet"  # a real-to-synthetic job's index of its real tiles, in OUT
# Bytes fetched per read while seeking through a tar or an image header: a header is 512 bytes
# (tar) or a few KB (PNG, JPEG), so a small block keeps an S3 seek to one short GET.
HEADER_BLOCK = 64 * 2**10
_SCHEMA = pa.schema([
    ("url", pa.dictionary(pa.int32(), pa.string())),  # a shard's URL repeats for each of its images
    ("offset", pa.int64()),  # start of the image member's data in the tar; null for an image file
    ("length", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
_UNREADABLE = (tarfile.TarError, *UNREADABLE_IMAGE)
ShardEntries = list[tuple[int, int, int, int]]  # (offset, length, width, height) per image of a shard


class IndexEntry(NamedTuple):
    url: str
    offset: int | None  # None: the whole object at url is the image
    length: int | None
    width: int
    height: int


@dataclass(frozen=True)
class ImageIndex:
    """The images of the set at ``source``, in set order, as columns (a million entries stay a
    few arrays, not a million objects)."""

    source: str
    from_shards: bool
    urls: tuple[str, ...]  # distinct URLs (one per shard or file)
    url_ids: np.ndarray  # int32, entry -> urls
    offsets: np.ndarray  # int64, -1 for an image file
    lengths: np.ndarray  # int64, -1 for an image file
    widths: np.ndarray  # int32
    heights: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.url_ids)

    def entry(self, i: int) -> IndexEntry:
        offset, length = int(self.offsets[i]), int(self.lengths[i])
        whole = offset < 0
        return IndexEntry(self.urls[self.url_ids[i]], None if whole else offset, None if whole else length,
                          int(self.widths[i]), int(self.heights[i]))

    def first_not_of_size(self, width: int, height: int) -> int | None:
        """The first entry whose header size is not width x height, or None."""
        wrong = np.flatnonzero((self.widths != width) | (self.heights != height))
        return int(wrong[0]) if len(wrong) else None


def index_image_set(url: str) -> ImageIndex:
    """Index the set at ``url`` (anything ``list_image_set`` takes): shards and files are read
    concurrently, a shard for its marker or its headers, a file for its header. An unreadable
    shard, marker or image is a one-line StorageError."""
    found = list_image_set(url)
    if found.from_shards:
        per_shard = _shards_entries(found.shards)
        rows = [(s, *row) for s, entries in enumerate(per_shard) for row in entries]
        return _from_rows(url, True, found.shards, rows)
    sizes = map_ordered(_file_size, found.files)
    rows = [(i, -1, -1, w, h) for i, (w, h) in enumerate(sizes)]
    return _from_rows(url, False, found.files, rows)


def _from_rows(source: str, from_shards: bool, urls: Sequence[str], rows: list[tuple[int, int, int, int, int]]) -> ImageIndex:
    columns = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return ImageIndex(source, from_shards, tuple(urls), columns[:, 0].astype(np.int32), columns[:, 1], columns[:, 2],
                      columns[:, 3].astype(np.int32), columns[:, 4].astype(np.int32))


def _open(url: str) -> IO[bytes]:
    fs, path = filesystem(url)
    return retrying(lambda: fs.open(path, "rb", block_size=HEADER_BLOCK), url, action="open")


def _file_size(url: str) -> tuple[int, int]:
    """An image file's (width, height) from its header: its first HEADER_BLOCK bytes (one ranged
    GET), the whole file only when a header runs past them (Pillow reads no pixel data on open)."""
    head = get_range(url, 0, HEADER_BLOCK)
    try:
        return _header_size(io.BytesIO(head))
    except _UNREADABLE as err:  # not an image, or a decompression bomb's header
        if len(head) < HEADER_BLOCK:  # the whole file was read: nothing more to try
            raise StorageError(f"cannot read image {redact_url(url)}: {describe(err)}") from None
    try:
        with _open(url) as f:
            return _header_size(f)
    except StorageError:
        raise
    except _UNREADABLE as err:
        raise StorageError(f"cannot read image {redact_url(url)}: {describe(err)}") from None


def _header_size(f: IO[bytes]) -> tuple[int, int]:
    with Image.open(f) as image:
        return image.size


def _shards_entries(shards: Sequence[str]) -> Iterator[ShardEntries]:
    """Each shard's entries, in shard order, read concurrently: from its marker where it records
    them, else from its headers."""
    listings = _output_listings(shards)
    return map_ordered(lambda shard: _marker_entries(shard, listings) or _header_entries(shard), shards)


class _Listing(NamedTuple):
    """What an output's listings say: the shards with a marker, and each tar's size by name."""

    marked: set[int]
    tar_sizes: dict[str, int]


def _output_listings(shards: Sequence[str]) -> dict[str, _Listing]:
    """The listing of each output the shards are in (stats/, then shards/ where it has markers)."""
    outputs = sorted({place[0] for place in map(shard_place, shards) if place})

    def listing(out_url: str) -> _Listing:
        marked = marked_shards(out_url)
        return _Listing(marked, tar_sizes(out_url) if marked else {})

    return dict(zip(outputs, map_ordered(listing, outputs)))


def _marker_entries(shard: str, listings: Mapping[str, _Listing]) -> ShardEntries | None:
    """The shard's entries from its marker's sample rows (one GET, no tar read), after checking
    that its tar is listed with the size the marker says; None where it has no marker, or one
    written before the rows recorded image offsets (the headers then say)."""
    place = shard_place(shard)
    if place is None or place[1] not in listings[place[0]].marked:
        return None
    url = stats_url(*place)
    stats = read_marker(url)
    samples = stats.get("samples")
    if not isinstance(samples, list) or not all(isinstance(row, dict) and "image_offset" in row for row in samples):
        return None
    try:
        problem = shard_problem(place[0], stats, listings[place[0]].tar_sizes)
        entries = [(int(r["image_offset"]), int(r["image_bytes"]), int(r["width"]), int(r["height"])) for r in shard_rows(stats)]
    except (KeyError, TypeError, ValueError) as err:
        raise StorageError(f"{redact_url(url)} is not a cytosynth shard marker: {describe(err)}") from None
    if problem:
        raise StorageError(f"cannot index shard {redact_url(shard)}: {problem}")
    return entries


def _header_entries(url: str) -> ShardEntries:
    """(offset, length, width, height) of each sample's image in one shard, from the tar's
    headers and each image's own header."""
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            samples = _tar_samples(tar)
            rows = [(info.offset_data, info.size, *_member_size(tar, info)) for info in samples]
            _check_archive_end(tar, f)
    except StorageError:
        raise
    except _UNREADABLE as err:  # a truncated or tampered shard
        raise StorageError(f"cannot read shard {redact_url(url)}: {describe(err)}") from None
    return rows


def _tar_samples(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The image member of each sample, in tar order, grouped as ``tars.iter_tar_samples`` groups
    them: consecutive members of one key; its image the first of ``IMAGE_EXTENSIONS`` it has."""
    samples: list[dict[str, tarfile.TarInfo]] = []
    last_key = None
    for info in tar:
        parts = split_member(info.name) if info.isreg() else None
        if parts is None:
            continue
        key, ext = parts
        if key != last_key:
            samples.append({})
            last_key = key
        if ext in samples[-1]:
            raise ValueError(f"duplicate member {info.name!r} in tar")
        samples[-1][ext] = info
    images = []
    for members in samples:
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None or "json" not in members:  # what reader.decode_sample refuses
            key = split_member(next(iter(members.values())).name)[0]
            raise ValueError(f"sample {key} lacks an image or its json")
        images.append(members[ext])
    return images


def _member_size(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[int, int]:
    member = tar.extractfile(info)
    assert member is not None  # regular files always have data
    return _header_size(member)


def _check_archive_end(tar: tarfile.TarFile, f: IO[bytes]) -> None:
    """tarfile ends quietly where a tar was cut between two members: a whole tar ends with a zero
    block after its last member, a cut one does not."""
    f.seek(tar.offset)
    if f.read(512) != bytes(512):
        raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")


def real_index_url(out_url: str) -> str:
    """Where a job output keeps the index of its real tiles (the one place that says)."""
    return join(out_url, REAL_INDEX_NAME)


def read_indexed_image(index: ImageIndex, i: int) -> np.ndarray:
    """Image ``i`` of the set as HxWx3 uint8, by one read of its bytes; unreadable: one-line StorageError."""
    entry = index.entry(i)
    if entry.offset is None:
        return read_image(entry.url)
    data = get_range(entry.url, entry.offset, entry.offset + entry.length)
    try:
        if len(data) != entry.length:
            raise OSError(f"{len(data)} of {entry.length} bytes")
        return decode_image(data)
    except UNREADABLE_IMAGE as err:
        raise StorageError(f"cannot read image {i} of shard {redact_url(entry.url)}: {describe(err)}") from None


def write_image_index(index: ImageIndex, url: str) -> None:
    """Write ``index`` to ``url`` as Parquet, whole (``put_bytes``)."""
    urls = pa.DictionaryArray.from_arrays(pa.array(index.url_ids, pa.int32()), pa.array(index.urls, pa.string()))
    whole = index.offsets < 0
    table = pa.table(
        [urls, pa.array(index.offsets, mask=whole), pa.array(index.lengths, mask=whole),
         pa.array(index.widths), pa.array(index.heights)],
        schema=_SCHEMA.with_metadata({"format": INDEX_FORMAT, "source": index.source,
                                      "from_shards": str(index.from_shards).lower()}),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put_bytes(url, buf.getvalue())


def read_image_index(url: str) -> ImageIndex:
    """The index written at ``url``; one that is not one is a one-line StorageError."""
    data = get_bytes(url)
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"not a {INDEX_FORMAT} file")
        urls = table.column("url").combine_chunks()
        return ImageIndex(
            meta["source"], meta["from_shards"] == "true", tuple(urls.dictionary.to_pylist()),
            urls.indices.to_numpy().astype(np.int32),
            *(table.column(c).combine_chunks().fill_null(-1).to_numpy().astype(np.int64) for c in ("offset", "length")),
            *(table.column(c).to_numpy().astype(np.int32) for c in ("width", "height")),
        )
    except (pa.ArrowException, ValueError, KeyError) as err:
        raise StorageError(f"{redact_url(url)} is not a cytosynth image index: {describe(err)}") from None
