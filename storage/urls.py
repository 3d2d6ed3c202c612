"""fsspec URL helpers: one way to turn a URL (local path, ``s3://``, ``memory://``...) into a filesystem.

Storage options (credentials included) are passed straight to fsspec and never stored or logged.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import fsspec
import fsspec.config
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

S3_PROTOCOLS = ("s3", "s3a")
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Requests in flight at once when many small objects are read (shard markers at finalize, through
# objects.map_ordered): enough to hide tens of ms of S3 latency per GET. An S3 client's connection
# pool is sized to match; botocore's default of 10 would queue the rest.
READ_CONCURRENCY = 32


def protocol(url: str) -> str:
    """The URL's scheme, ``"file"`` for plain paths (``"s3"`` for ``s3://b/k``)."""
    return split_protocol(str(url))[0] or "file"


def _with_s3_endpoint(options: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``client_kwargs.endpoint_url`` from $AWS_ENDPOINT_URL unless the caller gave one.

    botocore reads the variable too in recent versions; being explicit keeps older stacks and
    s3fs' instance cache (keyed by options) consistent with the environment.
    """
    options = dict(options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint and not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        client_kwargs["endpoint_url"] = endpoint
        options["client_kwargs"] = client_kwargs
    return options


def _with_s3_pool(options: Mapping[str, Any]) -> dict[str, Any]:
    """Size the client's connection pool for ``READ_CONCURRENCY`` unless the caller chose a size."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", READ_CONCURRENCY)
    return {**options, "config_kwargs": config}


def filesystem(url: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``url``; ``options`` are fsspec storage options (e.g. s3fs ``key``/``secret``)."""
    if protocol(url) in S3_PROTOCOLS:
        # fsspec's own configuration first: an explicit client_kwargs / config_kwargs replaces its
        # whole dict there, so the endpoint and pool size added here must extend it, not hide it.
        configured = {k: v for name in S3_PROTOCOLS for k, v in fsspec.config.conf.get(name, {}).items()}
        options = _with_s3_pool(_with_s3_endpoint({**configured, **options}))
    return url_to_fs(str(url), **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk, where whole-file visibility needs write-then-rename."""
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with ``/`` (``join("s3://b/out", "shards", "x.tar")``)."""
    url = str(url)
    head = url if url.endswith("://") else url.rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return head
    return head + tail if head.endswith("/") else f"{head}/{tail}"
