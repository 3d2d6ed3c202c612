"""The tar container of a WebDataset shard: deterministic writing and streaming reading.

Members are ``<key>.<ext>`` and the members of one sample are contiguous, which is what
webdataset's ``group_by_keys`` expects.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import IO, Iterable, Iterator

# Same split as webdataset's base_plus_ext: key is everything before the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar archive of ``(name, data)`` members in the given order, byte-for-byte reproducible."""
    return tar_layout(members)[0]


def tar_layout(members: Iterable[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """``tar_bytes`` of ``members`` and the byte offset where each member's data starts in it, in
    member order (member i is bytes ``[offset, offset + len(data))``: one ranged read)."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # Fixed metadata: the bytes depend on the names and contents alone.
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
            offsets.append(tar.offset - _padded(len(data)))  # the data, padded to whole blocks, ends at tar.offset
    return buf.getvalue(), offsets


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def split_member(name: str) -> tuple[str, str] | None:
    """``"000000017.png"`` -> ``("000000017", "png")``; None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[dict[str, bytes | str]]:
    """Stream ``{"__key__": key, ext: bytes, ...}`` per sample from an open tar file object.

    Reads sequentially (``r|``), so a shard is never copied to disk or held whole in memory.
    """
    sample: dict[str, bytes | str] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            parts = split_member(info.name) if info.isreg() else None
            if parts is None:
                continue
            key, ext = parts
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            if ext in sample:
                raise ValueError(f"duplicate member {info.name!r} in tar")
            member = tar.extractfile(info)
            assert member is not None  # regular files always have data
            sample[ext] = member.read()
    if sample is not None:
        yield sample
