"""JSON bytes for everything storage writes: deterministic, numpy-tolerant, never pickle."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    # synth hands over numpy scalars/arrays; JSON wants Python numbers and lists.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_plain(obj: Any) -> Any:
    """``obj`` as plain JSON types (lists, dicts, int, float, str, bool, None)."""
    return json.loads(json_bytes(obj))


def json_bytes(obj: Any, *, indent: int | None = None) -> bytes:
    """UTF-8 JSON with sorted keys, so equal objects always give equal bytes."""
    separators = (",", ": ") if indent else (",", ":")
    text = json.dumps(obj, sort_keys=True, indent=indent, separators=separators, default=_plain, allow_nan=False)
    return text.encode("utf-8")


def parse_json(data: bytes | str, what: str) -> Any:
    """Parse JSON; a ValueError names ``what`` (a URL or member) instead of a bare position."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
