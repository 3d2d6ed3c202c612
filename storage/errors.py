"""The one exception type storage raises at users: a one-line, credential-free message."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_MAX_CAUSE_CHARS = 300


class StorageError(OSError):
    """Storage failed for good (after retries): message is one line, names the URL and the cause."""


def redact_url(url: str) -> str:
    """``scheme://user:pass@host/p`` -> ``scheme://***@host/p``; other URLs unchanged."""
    return _USERINFO.sub(r"\g<scheme>***@", str(url))


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, short enough for a terminal and free of URL userinfo."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > _MAX_CAUSE_CHARS:
        text = text[: _MAX_CAUSE_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {redact_url(text)}"


def storage_error(action: str, url: str, exc: BaseException, *, attempts: int = 1) -> StorageError:
    """Build the user-facing error for ``action`` on ``url`` that failed with ``exc``."""
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    err = StorageError(f"cannot {action} {redact_url(url)}{tries}: {describe(exc)}")
    err.__cause__ = exc
    return err
