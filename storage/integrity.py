"""Is a job output what its markers say? Shard tars against their markers, markers against the
job, the manifest against the markers; and taking a damaged shard back out of the dataset.

Checks, cheapest first: a committed shard's tar exists and has the marker's ``tar_bytes`` (one
listing of ``shards/``), its marker names this job's ``config_sha256``, and, when asked, the tar's
SHA-256 is the marker's ``tar_sha256`` (reads every tar). ``uncommit`` removes ``_SUCCESS`` and
the damaged shards' markers, so the ordinary resume path makes them again.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StorageError
from .job import SUCCESS_NAME, job_config_sha256
from .manifest import MANIFEST_NAME, manifest_rows, manifest_table
from .objects import delete, exists, get_bytes
from .reader import open_shard
from .retry import retrying
from .shards import SHARDS_DIR, committed_shards, iter_shard_stats, read_shard_stats, shard_name, shard_url, stats_url
from .urls import filesystem, join

READ_THREADS = 16  # markers are small objects: read many at once (a resume of 10k shards on S3)
_HASH_CHUNK = 1 << 20

__all__ = ["damaged_shards", "manifest_problem", "shard_problem", "tar_sha256", "tar_sizes", "uncommit"]


def tar_sizes(out_url: str) -> dict[str, int]:
    """Size of every object in ``out_url``'s ``shards/`` by base name (one listing)."""
    url = join(out_url, SHARDS_DIR)
    fs, path = filesystem(url)

    def ls() -> dict[str, int]:
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}

    return retrying(ls, url, action="list")


def tar_sha256(url: str) -> str:
    """SHA-256 of the object at ``url``, streamed."""
    def read() -> str:
        digest = hashlib.sha256()  # afresh on every attempt
        with open_shard(url) as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    return retrying(read, url, action="read")


def shard_problem(
    out_url: str,
    stats: Mapping[str, Any],
    sizes: Mapping[str, int],
    *,
    hash_tars: bool = False,
) -> str | None:
    """What is wrong with the committed shard ``stats`` describes (None: nothing). ``sizes``
    are those of ``tar_sizes``; ``hash_tars`` also reads the tar to compare its SHA-256."""
    index = int(stats["shard"])
    size = sizes.get(f"{shard_name(index)}.tar")
    if size is None:
        return "its tar is missing"
    if size != stats["tar_bytes"]:
        return f"its tar is {size} bytes, its marker says {stats['tar_bytes']}"
    if hash_tars and tar_sha256(shard_url(out_url, index)) != stats["tar_sha256"]:
        return "its tar's SHA-256 is not its marker's"
    return None


def damaged_shards(
    out_url: str,
    *,
    hash_tars: bool = False,
    config_sha256: str | None = None,
    strict: bool = True,
) -> dict[int, str]:
    """Committed shards of ``out_url`` whose tar is missing, of another size than its marker says
    or (``hash_tars``) of another SHA-256: shard index -> what is wrong.

    A marker that is unreadable or names another job than ``config_sha256`` (default: the one in
    job.json) raises its one-line StorageError when ``strict`` (a resume must not quietly remake
    another job's shard), else it is reported like a damaged tar (``verify``).
    """
    if config_sha256 is None:
        config_sha256 = job_config_sha256(out_url)
    sizes = tar_sizes(out_url)

    def check(index: int) -> str | None:
        try:
            stats = read_shard_stats(out_url, index, config_sha256=config_sha256)
        except StorageError as err:
            if strict:
                raise
            return str(err).split("; run ")[0]
        return shard_problem(out_url, stats, sizes, hash_tars=hash_tars)

    indices = sorted(committed_shards(out_url))
    with ThreadPoolExecutor(READ_THREADS) as pool:
        problems = pool.map(check, indices)
        return {i: p for i, p in zip(indices, problems) if p}


def manifest_problem(out_url: str, *, config_sha256: str | None = None) -> str | None:
    """What is wrong with ``manifest.parquet`` (missing, unreadable, or not the rows of the
    committed shards' markers); None when it matches."""
    url = join(out_url, MANIFEST_NAME)
    if not exists(url):
        return "it is missing"
    try:
        table = pq.read_table(io.BytesIO(get_bytes(url)))
    except (OSError, ValueError) as err:
        return f"it is unreadable ({type(err).__name__})"
    stats = iter_shard_stats(out_url, config_sha256=config_sha256)
    expected = manifest_table(list(manifest_rows(out_url, stats=stats)))
    return None if table.equals(_as_written(expected, table)) else "its rows are not those of the committed shards"


def _as_written(expected: pa.Table, table: pa.Table) -> pa.Table:
    """``expected`` without ``image_offset`` where the manifest has no such column and no marker
    records one: an output written before markers recorded offsets is still whole."""
    if "image_offset" not in table.column_names and expected.column("image_offset").null_count == len(expected):
        return expected.drop_columns(["image_offset"])
    return expected


def uncommit(out_url: str, shards: Iterable[int]) -> None:
    """Take ``shards`` out of the dataset: ``_SUCCESS`` first (the dataset is no longer whole),
    then each marker (the shard no longer exists for readers; its tar is overwritten when the
    shard is made again). A crash in between leaves a consistent, resumable output."""
    shards = sorted(shards)
    if shards:
        delete(join(out_url, SUCCESS_NAME))
    for index in shards:
        delete(stats_url(out_url, index))
