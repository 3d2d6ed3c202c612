"""The one exception type storage raises at users: a one-line, credential-free message."""

from __future__ import annotations

import re
from collections.abc import Iterable

# userinfo: "user@" or "user:password@", where a password (e.g. an AWS secret) may hold "/".
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<userinfo>[^/@\s:]+:[^@\s]+?|[^/@\s]+)@")
_MIN_SECRET_CHARS = 4  # shorter "secrets" would redact ordinary words
_MAX_CAUSE_CHARS = 300


class StorageError(OSError):
    """Storage failed for good (after retries): message is one line, names the URL and the cause."""


def redact_url(url: str) -> str:
    """``scheme://user:pass@host/p`` -> ``scheme://***@host/p``; other URLs unchanged."""
    return _USERINFO.sub(r"\g<scheme>***@", str(url))


def url_secrets(texts: Iterable[str]) -> set[str]:
    """The userinfo (``KEY:SECRET``) of every URL in ``texts`` and each of its parts: what must
    never leave the process, even where a library quotes it without its ``scheme://`` (botocore
    names the "bucket" ``KEY:SECRET@bucket``)."""
    found: set[str] = set()
    for text in texts:
        for match in _USERINFO.finditer(str(text)):
            userinfo = match.group("userinfo")
            found.update(p for p in (userinfo, *userinfo.split(":", 1)) if len(p) >= _MIN_SECRET_CHARS)
    return found


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL userinfo and every one of ``secrets`` replaced by ``***``."""
    text = redact_url(text)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: "K:S" before "K"
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, "***")
    return text


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
