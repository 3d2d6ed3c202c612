"""Local copies of remote model files and folders, made once per machine.

A `--model-dir s3://...` bundle (GBs for sd15) is needed as local files by every run and by every
replica on a node. Each remote file or folder is copied once into a cache entry named by its
fingerprint, taken from the store's listing without reading any weights: the URL's path, and
every file's relative name, size and version tag (ETag, mtime). A changed bundle lists differently
and gets a new entry; an unchanged one is found again by later runs and by the other replicas of
the node. An entry is complete once it exists: it is downloaded beside the cache under a temporary
name and renamed into place, so replicas loading at once never see half a copy.

Where: `$CYTOSYNTH_CACHE`, else `$XDG_CACHE_HOME/cytosynth`, else `~/.cache/cytosynth`; entries
under `models/`. Nothing evicts them: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

# Listing fields that change when a file's content does, on the stores fsspec knows (s3, gcs,
# azure, http, memory, local).
_VERSION_FIELDS = ("size", "ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "mtime", "created")


def cache_root() -> Path:
    """Where cached models live on this machine (see the module docstring)."""
    explicit = os.environ.get("CYTOSYNTH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cytosynth"


def cached_copy(url: str) -> Path:
    """A local path holding the remote file or folder `url`, downloaded only if not cached yet."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.exists(path)
    except (OSError, ValueError) as exc:  # unreachable host, malformed URL (fsspec/aiohttp raise both)
        raise InvalidInputError(f"cannot read model path {url}: {str(exc).splitlines()[0]}") from None
    if not found:
        raise InvalidInputError(f"model path not found: {url}")
    name = Path(path.rstrip("/")).name
    entry = cache_root() / "models" / remote_fingerprint(fs, path)
    if not entry.exists():
        _download(fs, path, entry, name)
    return entry / name


def remote_fingerprint(fs: Any, path: str) -> str:
    """sha256 over the path and each file's (relative name, size, version tag) in the listing."""
    if fs.isdir(path):
        listing = fs.find(path, detail=True, withdirs=False)
        prefix = path.rstrip("/") + "/"
        files = {name.removeprefix(prefix): info for name, info in listing.items()}
    else:
        files = {"": fs.info(path)}
    described = {
        rel: {key: str(info[key]) for key in _VERSION_FIELDS if info.get(key) is not None}
        for rel, info in sorted(files.items())
    }
    text = json.dumps({"protocol": str(fs.protocol), "path": path, "files": described}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _download(fs: Any, path: str, entry: Path, name: str) -> None:
    """Copy into a fresh folder beside `entry`, then rename it into place (atomic on one file
    system); when another process got there first its entry is kept and this copy dropped."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        fs.get(path, str(staging / name), recursive=fs.isdir(path))
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
