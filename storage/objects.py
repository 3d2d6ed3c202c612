"""Whole objects in and out: a reader sees all of an object or none of it.

Local files are written to a hidden temp name in the same folder, then renamed (atomic on POSIX);
object stores (S3, memory) get one put, and an S3 object appears only when its upload completes.
Every S3 put (one PUT, up to 5 GiB) carries the SHA-256 of its bytes, so S3 refuses (BadDigest)
an upload corrupted on the way. ``create_bytes`` is the exclusive form (a claim): it writes only where nothing exists.
Every call is retried on transient errors and fails with StorageError.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import uuid
from typing import Any, Mapping

import fsspec

from .retry import DEFAULT_RETRY, Retry, retrying
from .urls import S3_PROTOCOLS, filesystem, is_local

TEMP_PREFIX = ".tmp-"
# One PUT up to S3's single-object limit (5 GiB): s3fs switches to multipart above 2 x chunksize,
# and a multipart upload cannot carry the whole object's SHA-256. Shards are in memory anyway.
_SINGLE_PUT_LIMIT = 5 * 2**30


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
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in flight
        if exclusive:
            os.link(temp, path)  # atomic, and fails if path exists (rename would replace it)
        else:
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


def create_bytes(
    url: str,
    data: bytes,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> bool:
    """Write ``data`` to ``url`` only if nothing is there (atomically); False if something was.

    A retried attempt that finds the object may find its own earlier attempt (the response was
    lost): callers read what is there and compare, they do not assume another writer.
    """
    fs, path = filesystem(url, **(storage_options or {}))

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



def delete(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: Retry = DEFAULT_RETRY,
) -> None:
    """Remove the object at ``url``; nothing there is fine."""
    fs, path = filesystem(url, **(storage_options or {}))

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retrying(rm, url, action="delete", policy=retry)
