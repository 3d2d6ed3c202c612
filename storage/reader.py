"""Reading committed shards back: shard URL lists, streamed samples, and a webdataset opener stage."""

from __future__ import annotations

import posixpath
import re
import tarfile
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

from braceexpand import braceexpand

from .errors import StorageError, describe, redact_url
from .images import UNREADABLE_IMAGE, decode_image
from .job import JOB_NAME, SUCCESS_NAME
from .jsonio import parse_json, to_plain
from .objects import exists, get_bytes, list_names
from .retry import DEFAULT_RETRY, Retry, retrying
from .shards import SHARDS_DIR, STATS_DIR, committed_shards, marker_url, shard_name, shard_url
from .tars import iter_tar_samples
from .urls import filesystem, join

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_PATTERN = re.compile(r"[*?\[{]")


def shard_urls(url: str) -> list[str]:
    """Shard URLs named by ``url``: a job output folder (its committed shards), one ``.tar``,
    a brace pattern (``.../{000000..000003}.tar``, taken as named) or a glob (``.../shards/*.tar``,
    committed shards only)."""
    url = str(url)
    if "{" in url:
        # braceexpand is what webdataset expands "{000000..000009}" with, so both read the same shards.
        return [u for pattern in braceexpand(url) for u in shard_urls(pattern)]
    fs, path = filesystem(url)
    if _PATTERN.search(url):
        fs.invalidate_cache()
        found = sorted(fs.glob(path))
        if path.endswith(".tar"):  # a glob over an output's shards keeps the committed ones
            found = [p for p in found if _is_committed(fs, p)]
        return [fs.unstrip_protocol(p) for p in found]
    if url.endswith(".tar"):
        return [url]
    return [shard_url(url, i) for i in sorted(committed_shards(url))]


def _is_committed(fs: Any, path: str) -> bool:
    """False only for a tar of a cytosynth output (its stats/ folder exists) without its marker."""
    marker = marker_url(path)
    if marker is None or not fs.isdir(posixpath.dirname(marker)):
        return True  # a tar written by other tools: nothing marks it, take it as named
    return fs.exists(marker)


def committed_shard_urls(out_url: str) -> list[str]:
    """The exact list of committed shard URLs of the output ``out_url`` (local or any fsspec URL),
    in shard order: hand it to webdataset, Ray Data or Hugging Face ``datasets`` as it is.

    One-line StorageError naming the URL when ``out_url`` is not an output, holds no committed
    shard, or a committed shard (marker written, or counted in ``_SUCCESS``) has no tar.
    """
    name = redact_url(out_url)
    committed = sorted(committed_shards(out_url))
    if not committed:
        if not exists(join(out_url, JOB_NAME)):
            raise StorageError(f"{name} is not a cytosynth output (no {JOB_NAME} and no {STATS_DIR}/ folder)")
        raise StorageError(f"{name} has no committed shard yet (no {STATS_DIR}/*.json)")
    tars = set(list_names(join(out_url, SHARDS_DIR)))
    missing = [i for i in committed if f"{shard_name(i)}.tar" not in tars]
    expected = _success_shards(out_url)
    if expected is not None:
        missing += sorted(set(range(expected)) - set(committed))
    if missing:
        raise StorageError(
            f"{name}: shard {shard_url(name, missing[0])} is committed but missing"
            + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return [shard_url(out_url, i) for i in committed]


def _success_shards(out_url: str) -> int | None:
    """Shard count ``_SUCCESS`` records, or None before the job is complete."""
    url = join(out_url, SUCCESS_NAME)
    if not exists(url):
        return None
    try:
        summary = to_plain(parse_json(get_bytes(url), redact_url(url)))
    except ValueError as err:  # names the file already
        raise StorageError(str(err)) from None
    shards = summary.get("shards") if isinstance(summary, dict) else None
    if shards is not None and (not isinstance(shards, int) or isinstance(shards, bool) or shards < 0):
        raise StorageError(f"{redact_url(url)}: 'shards' is not a shard count: {shards!r:.40}")
    return shards


def open_shard(url: str, *, retry: Retry = DEFAULT_RETRY) -> IO[bytes]:
    """Open a shard for streaming reads (any fsspec URL)."""
    fs, path = filesystem(url)
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


def read_samples(url: str | Sequence[str]) -> Iterator[dict[str, Any]]:
    """Yield decoded samples from committed shards, streaming one shard at a time.

    ``url`` is anything ``shard_urls`` accepts, or a list of shard URLs.
    """
    urls = [url] if isinstance(url, str) else list(url)
    for shard in (s for u in urls for s in shard_urls(u)):
        try:
            with open_shard(shard) as stream:
                for raw in iter_tar_samples(stream):
                    yield decode_sample(raw)
        except StorageError:
            raise
        except UNREADABLE_IMAGE + (tarfile.TarError,) as err:  # a truncated or tampered shard
            raise StorageError(f"cannot read shard {redact_url(shard)}: {describe(err)}") from None


def open_shards(sources: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: ``{"url"}`` -> ``{"url", "stream"}`` through fsspec.

    webdataset opens local paths itself; this stage lets it read ``s3://`` or ``memory://`` shards:
    ``wds.DataPipeline(wds.SimpleShardList(urls), open_shards, tar_file_expander, group_by_keys)``.
    """
    for source in sources:
        yield {**source, "stream": open_shard(source["url"])}
