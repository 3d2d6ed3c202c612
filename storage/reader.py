"""Reading committed shards back: shard URL lists, streamed samples, and a webdataset opener stage."""

from __future__ import annotations

import re
import tarfile
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

from braceexpand import braceexpand

from .errors import StorageError, describe, redact_url
from .images import UNREADABLE_IMAGE, decode_image
from .jsonio import parse_json
from .retry import DEFAULT_RETRY, Retry, retrying
from .shards import committed_shards, shard_url
from .tars import iter_tar_samples
from .urls import filesystem

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_PATTERN = re.compile(r"[*?\[{]")


def shard_urls(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs named by ``url``: a job output folder (its committed shards), one ``.tar``,
    a brace pattern (``.../{000000..000003}.tar``, taken as named) or a glob (``.../shards/*.tar``,
    committed shards only)."""
    url = str(url)
    if "{" in url:
        # braceexpand is what webdataset expands "{000000..000009}" with, so both read the same shards.
        return [u for pattern in braceexpand(url) for u in shard_urls(pattern, storage_options=storage_options)]
    fs, path = filesystem(url, **(storage_options or {}))
    if _PATTERN.search(url):
        fs.invalidate_cache()
        found = sorted(fs.glob(path))
        if path.endswith(".tar"):  # a glob over shards keeps the committed ones (their .json exists)
            markers = set(fs.glob(path[: -len(".tar")] + ".json"))
            found = [p for p in found if p[: -len(".tar")] + ".json" in markers]
        return [fs.unstrip_protocol(p) for p in found]
    if url.endswith(".tar"):
        return [url]
    return [shard_url(url, i) for i in sorted(committed_shards(url, storage_options=storage_options))]


def open_shard(
    url: str, *, storage_options: Mapping[str, Any] | None = None, retry: Retry = DEFAULT_RETRY
) -> IO[bytes]:
    """Open a shard for streaming reads (any fsspec URL)."""
    fs, path = filesystem(url, **(storage_options or {}))
    return retrying(lambda: fs.open(path, "rb"), url, action="open", policy=retry)


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``{"__key__", "json": bytes, "png"|"jpg"|"webp": bytes}`` -> ``{"key", "tile_index", "image", "json"}``.

    Only images and JSON are decoded; other members are ignored (nothing is ever unpickled).
    """
    key = str(raw["__key__"])
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None or "json" not in raw:
        raise ValueError(f"sample {key} lacks an image or its json")
    return {
        "key": key,
        "tile_index": int(key.rsplit("/", 1)[-1]),
        "image": decode_image(raw[ext]),
        "json": parse_json(raw["json"], f"{key}.json"),
    }


def read_samples(
    url: str | Sequence[str], *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield decoded samples from committed shards, streaming one shard at a time.

    ``url`` is anything ``shard_urls`` accepts, or a list of shard URLs.
    """
    urls = [url] if isinstance(url, str) else list(url)
    for shard in (s for u in urls for s in shard_urls(u, storage_options=storage_options)):
        try:
            with open_shard(shard, storage_options=storage_options) as stream:
                for raw in iter_tar_samples(stream):
                    yield decode_sample(raw)
        except StorageError:
            raise
        except UNREADABLE_IMAGE + (tarfile.TarError,) as err:  # a truncated or tampered shard
            raise StorageError(f"cannot read shard {redact_url(shard)}: {describe(err)}") from None


def open_shards(
    sources: Iterable[Mapping[str, Any]], *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: ``{"url"}`` -> ``{"url", "stream"}`` through fsspec.

    webdataset opens local paths itself; this stage lets it read ``s3://`` or ``memory://`` shards:
    ``wds.DataPipeline(wds.SimpleShardList(urls), open_shards, tar_file_expander, group_by_keys)``.
    """
    for source in sources:
        yield {**source, "stream": open_shard(source["url"], storage_options=storage_options)}
