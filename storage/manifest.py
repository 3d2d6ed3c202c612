"""``manifest.parquet``: one row per sample, built from the committed shards' stats JSON."""

from __future__ import annotations

import io
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .annotations import MANIFEST_FIELDS
from .objects import get_bytes, open_whole
from .shards import iter_shard_stats
from .urls import join

MANIFEST_NAME = "manifest.parquet"
ROW_GROUP_ROWS = 65536  # rows buffered per Parquet row group: memory stays flat for any job size
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("tile_index", pa.int64()),
        ("shard", pa.int32()),
        ("seed", pa.int64()),
        ("boxes", pa.list_(pa.list_(pa.int32()))),  # xyxy pixels
        ("labels", pa.list_(pa.string())),
        ("category_ids", pa.list_(pa.int32())),  # ASC-US 1, ASC-H 2, LSIL 3, HSIL 4, per box
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_format", pa.string()),  # png, jpg, webp (lossy) or webp-lossless
        ("image_bytes", pa.int64()),  # size of the encoded image in its shard
        # Where it starts in the shard's tar: the image is bytes [image_offset, image_offset +
        # image_bytes), one ranged read. Null in rows of markers written before it was recorded.
        ("image_offset", pa.int64()),
    ]
)
assert tuple(MANIFEST_SCHEMA.names) == MANIFEST_FIELDS


def shard_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest rows a shard's stats JSON carries, in tile order."""
    return sorted(stats["samples"], key=lambda row: row["tile_index"])


def manifest_rows(
    out_url: str,
    *,
    stats: Iterable[Mapping[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Manifest rows of every committed shard (or of ``stats``, shard stats in shard order), in
    tile order (no tar is opened)."""
    if stats is None:
        stats = iter_shard_stats(out_url)
    for shard in stats:
        yield from shard_rows(shard)


def manifest_table(rows: Iterator[Mapping[str, Any]] | list[Mapping[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with ``MANIFEST_SCHEMA``."""
    return pa.Table.from_pylist([{f: row.get(f) for f in MANIFEST_FIELDS} for row in rows], schema=MANIFEST_SCHEMA)


def write_manifest(
    out_url: str,
    *,
    stats: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """Write ``manifest.parquet`` under ``out_url`` from the committed shards; return its URL.

    Rows stream through one row group at a time into the object as it is uploaded
    (``open_whole``: multipart on S3), so a million-tile manifest needs memory for
    ``ROW_GROUP_ROWS`` rows and one upload part, never the whole file; it appears whole or, on any
    error, not at all. ``stats`` lets a caller that also reads the shard stats (e.g. to add up
    totals) pass them in, so they are read once.
    """
    rows = manifest_rows(out_url, stats=stats)
    url = join(out_url, MANIFEST_NAME)
    with open_whole(url) as f, pq.ParquetWriter(f, MANIFEST_SCHEMA) as writer:
        while chunk := list(islice(rows, ROW_GROUP_ROWS)):
            writer.write_table(manifest_table(chunk))
    return url


def read_manifest(out_url: str) -> pa.Table:
    """The manifest as an Arrow table (``.to_pylist()`` for dicts, ``.to_pandas()`` for a frame)."""
    data = get_bytes(join(out_url, MANIFEST_NAME))
    return pq.read_table(io.BytesIO(data))
