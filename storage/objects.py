"""Whole objects in and out: a reader sees all of an object or none of it.

Local files are written to a hidden temp name in the same folder, then renamed (atomic on POSIX;
a writer killed in between leaves the temp file, which ``remove_temp_files`` clears); object
stores (S3, memory) get one put, and an S3 object appears only when its upload completes.
Every S3 put (one PUT, up to 5 GiB) carries the SHA-256 of its bytes, so S3 refuses (BadDigest)
an upload corrupted on the way. ``create_bytes`` is the exclusive form (a claim): it writes only
where nothing exists.
Every call is retried on transient errors and fails with StorageError. ``open_whole`` streams a
large object (S3: multipart; its parts are retried by s3fs) and ``map_ordered`` reads many small
ones concurrently.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import posixpath
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import IO, TypeVar

import fsspec

from .errors import StorageError, storage_error
from .retry import DEFAULT_RETRY, Retry, retrying
from .urls import READ_CONCURRENCY, S3_PROTOCOLS, filesystem, is_local

TEMP_PREFIX = ".tmp-"
# One PUT up to S3's single-object limit (5 GiB): s3fs switches to multipart above 2 x chunksize,
# and a multipart upload cannot carry the whole object's SHA-256. Shards are in memory anyway.
_SINGLE_PUT_LIMIT = 5 * 2**30
# Part size of a streamed S3 upload: what one stream holds in memory (S3's minimum part is 5 MiB;
# 10,000 parts of 16 MiB allow a 160 GB object).
STREAM_PART_BYTES = 16 * 2**20
T = TypeVar("T")
R = TypeVar("R")


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> None:
    """One attempt at writing ``data`` to ``path`` on ``fs`` so that it appears whole.

    ``exclusive``: FileExistsError if ``path`` exists, decided atomically by the store (a local
    hard link; S3's conditional put ``If-None-Match: *``; memory's exclusive open).
    """
    if is_local(fs):
        _local_put(path, data, exclusive)
        return
    mode = "create" if exclusive else "overwrite"
    if _is_s3(fs) and len(data) < _SINGLE_PUT_LIMIT:
        fs.pipe_file(path, data, mode=mode, **_s3_checksum(data))
    else:
        fs.pipe_file(path, data, mode=mode)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(set(protocols) & set(S3_PROTOCOLS))


def _s3_checksum(data: bytes) -> dict[str, object]:
    """put_object arguments that make S3 check the bytes it received against their SHA-256."""
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    return {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": digest, "chunksize": _SINGLE_PUT_LIMIT // 2}


def _local_put(path: str, data: bytes, exclusive: bool = False) -> None:
    with _local_stream(path, exclusive) as f:
        f.write(data)


def put_bytes(
    url: str,
    data: bytes,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> None:
    """Write ``data`` to ``url`` so that it appears whole (replacing any existing object)."""
    fs, path = filesystem(url)
    retrying(partial(write_whole, fs, path, data), url, action="write", policy=retry)


def create_bytes(
    url: str,
    data: bytes,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> bool:
    """Write ``data`` to ``url`` only if nothing is there (atomically); False if something was.

    A retried attempt that finds the object may find its own earlier attempt (the response was
    lost): callers read what is there and compare, they do not assume another writer.
    """
    fs, path = filesystem(url)

    def create() -> bool:
        try:
            write_whole(fs, path, data, exclusive=True)
        except FileExistsError:
            return False
        return True

    return retrying(create, url, action="write", policy=retry)


def get_bytes(
    url: str,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> bytes:
    """Read the whole object at ``url``."""
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path), url, action="read", policy=retry)


def get_range(
    url: str,
    start: int,
    end: int,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` (S3: one ranged GET)."""
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path, start=start, end=end), url, action="read", policy=retry)


def exists(
    url: str,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> bool:
    """True if an object (or folder) exists at ``url``; asks the store, not a listing cache."""
    fs, path = filesystem(url)

    def check() -> bool:
        fs.invalidate_cache(posixpath.dirname(path))  # another process may have written it
        return fs.exists(path)

    return retrying(check, url, action="check", policy=retry)


def list_names(
    url: str,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> list[str]:
    """Sorted base names of the objects directly under folder ``url``; [] if it does not exist."""
    fs, path = filesystem(url)

    def ls() -> list[str]:
        fs.invalidate_cache(path)  # listings are cached per instance; resume needs the truth
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")

    return retrying(ls, url, action="list", policy=retry)


def delete(
    url: str,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> None:
    """Remove the object at ``url``; nothing there is fine."""
    fs, path = filesystem(url)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retrying(rm, url, action="delete", policy=retry)


def remove_temp_files(
    url: str,
    *,
    retry: Retry = DEFAULT_RETRY,
) -> list[str]:
    """Remove the hidden temp files that writers killed mid-write left anywhere under folder
    ``url``; returns their paths relative to it. Local disk only: an object store has no temp
    names (a put appears whole or not at all). Call it only when no writer of that folder is
    running (a job resuming, before its workers start): a live writer's temp file goes too."""
    fs, root = filesystem(url)
    if not is_local(fs):
        return []

    def sweep() -> list[str]:
        removed = []
        for folder, _, names in os.walk(root):
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    path = os.path.join(folder, name)
                    try:
                        os.remove(path)
                    except FileNotFoundError:  # its writer finished after all
                        continue
                    removed.append(os.path.relpath(path, root))
        return sorted(removed)

    return retrying(sweep, url, action="clean up", policy=retry)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], concurrency: int = READ_CONCURRENCY) -> Iterator[R]:
    """``fn`` over ``items`` on ``concurrency`` threads, results yielded in the order of ``items``.

    At most ``2 * concurrency`` calls are ahead of the consumer (memory is bounded whatever the
    number of items; the second half keeps threads busy behind a slow head). The first error, in
    item order, is raised; calls not yet started are cancelled when the consumer stops.
    """
    items = iter(items)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="cytosynth-read") as pool:
        window = deque(pool.submit(fn, item) for item in islice(items, 2 * concurrency))
        try:
            while window:
                result = window.popleft().result()
                window.extend(pool.submit(fn, item) for item in islice(items, 1))
                yield result
        finally:
            for future in window:
                future.cancel()


@contextmanager
def open_whole(url: str) -> Iterator[IO[bytes]]:
    """A binary file to stream an object into: it appears at ``url`` whole when the block ends,
    and not at all if the block raises (StorageError for a storage failure).

    Memory stays flat for any size on local disk (temp file, then rename) and S3 (a multipart
    upload of ``STREAM_PART_BYTES`` parts, completed at the end, aborted on error). Other stores
    are buffered and written with one put, as ``put_bytes`` does.
    """
    fs, path = filesystem(url)
    if is_local(fs):
        opened = _local_stream(path)
    elif _is_s3(fs):
        opened = _s3_stream(fs, path)
    else:
        opened = _buffered_stream(fs, path, url)
    try:
        with opened as f:
            yield f
    except StorageError:
        raise
    except OSError as exc:  # fsspec and s3fs raise OSErrors; the caller's own errors pass through
        raise storage_error("write", url, exc) from exc


@contextmanager
def _local_stream(path: str, exclusive: bool = False) -> Iterator[IO[bytes]]:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in flight
        if exclusive:
            os.link(temp, path)  # atomic, and fails if path exists (rename would replace it)
        else:
            os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


@contextmanager
def _s3_stream(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    f = fs.open(path, "wb", block_size=STREAM_PART_BYTES)
    try:
        yield f
        f.close()  # uploads the last part and completes the upload (one put if it never filled a part)
    except BaseException:
        f.discard()  # aborts the multipart upload: no object appears, no parts are left to pay for
        f.closed = True  # so that neither close() nor garbage collection uploads the rest
        raise


@contextmanager
def _buffered_stream(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Iterator[IO[bytes]]:
    buf = io.BytesIO()
    yield buf
    retrying(lambda: write_whole(fs, path, buf.getvalue()), url, action="write")
