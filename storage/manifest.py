"""``manifest.parquet``: one row per sample, built from the committed shards' stats JSON."""

from __future__ import annotations

import io
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .annotations import MANIFEST_FIELDS
from .objects import get_bytes, put_bytes
from .shards import iter_shard_stats
from .urls import join

MANIFEST_NAME = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("tile_index", pa.int64()),
        ("shard", pa.int32()),
        ("seed", pa.int64()),
        ("boxes", pa.list_(pa.list_(pa.int32()))),  # xyxy pixels
        ("labels", pa.list_(pa.string())),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
assert tuple(MANIFEST_SCHEMA.names) == MANIFEST_FIELDS


def shard_rows(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest rows a shard's stats JSON carries, in tile order."""
    return sorted(stats["samples"], key=lambda row: row["tile_index"])


def manifest_rows(out_url: str, *, storage_options: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Manifest rows of every committed shard, in tile order (no tar is opened)."""
    for stats in iter_shard_stats(out_url, storage_options=storage_options):
        yield from shard_rows(stats)


def manifest_table(rows: Iterator[Mapping[str, Any]] | list[Mapping[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with ``MANIFEST_SCHEMA``."""
    return pa.Table.from_pylist([{f: row.get(f) for f in MANIFEST_FIELDS} for row in rows], schema=MANIFEST_SCHEMA)


def write_manifest(out_url: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``manifest.parquet`` under ``out_url`` from the committed shards; return its URL."""
    buf = io.BytesIO()
    pq.write_table(manifest_table(manifest_rows(out_url, storage_options=storage_options)), buf)
    url = join(out_url, MANIFEST_NAME)
    put_bytes(url, buf.getvalue(), storage_options=storage_options)
    return url


def read_manifest(out_url: str, *, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The manifest as an Arrow table (``.to_pylist()`` for dicts, ``.to_pandas()`` for a frame)."""
    data = get_bytes(join(out_url, MANIFEST_NAME), storage_options=storage_options)
    return pq.read_table(io.BytesIO(data))
