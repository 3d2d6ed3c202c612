"""Whole objects in and out: a reader sees all of an object or none of it.

Local files are written to a hidden temp name in the same folder, then renamed (atomic on POSIX);
object stores (S3, memory) get one put, and an S3 object appears only when its upload completes.
Every call is retried on transient errors and fails with StorageError.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Mapping

import fsspec

from .retry import DEFAULT_RETRY, Retry, retrying
from .urls import filesystem, is_local

TEMP_PREFIX = ".tmp-"


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One attempt at writing ``data`` to ``path`` on ``fs`` so that it appears whole."""
    if is_local(fs):
        _local_put(path, data)
    else:
        fs.pipe_file(path, data)


def _local_put(path: str, data: bytes) -> None:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in flight
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def put_bytes(
    url: str,
    data: bytes,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> None:
    """Write ``data`` to ``url`` so that it appears whole (replacing any existing object)."""
    fs, path = filesystem(url, **(storage_options or {}))
    retrying(lambda: write_whole(fs, path, data), url, action="write", policy=retry)


def get_bytes(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> bytes:
    """Read the whole object at ``url``."""
    fs, path = filesystem(url, **(storage_options or {}))
    return retrying(lambda: fs.cat_file(path), url, action="read", policy=retry)


def exists(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> bool:
    """True if an object (or folder) exists at ``url``; asks the store, not a listing cache."""
    fs, path = filesystem(url, **(storage_options or {}))

    def check() -> bool:
        fs.invalidate_cache(posixpath.dirname(path))  # another process may have written it
        return fs.exists(path)

    return retrying(check, url, action="check", policy=retry)


def list_names(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> list[str]:
    """Sorted base names of the objects directly under folder ``url``; [] if it does not exist."""
    fs, path = filesystem(url, **(storage_options or {}))

    def ls() -> list[str]:
        fs.invalidate_cache(path)  # listings are cached per instance; resume needs the truth
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")

    return retrying(ls, url, action="list", policy=retry)

