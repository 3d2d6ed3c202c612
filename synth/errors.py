"""User-facing errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class InvalidInputError(ValueError):
    """Bad user input (weights, plans, images). The message is one line; the CLI prints
    ``error: <message>`` and exits non-zero instead of showing a traceback."""


@contextmanager
def named_as_urls(copies: Mapping[str, str | None]) -> Iterator[None]:
    """Errors raised about local copies of remote files name the user's URLs instead.

    ``copies`` maps a local copy (a temporary download) to the URL it came from; an
    ``InvalidInputError`` raised inside has each local path replaced by its URL, so that the line
    the user reads is about ``s3://models/unet``, not ``/tmp/cytosynth-model-1a2b/unet``."""
    try:
        yield
    except InvalidInputError as err:
        message = str(err)
        # Longest first: a copy's sub-path is replaced before its folder would be.
        for local, url in sorted(copies.items(), key=lambda item: -len(item[0])):
            if url and local != url:
                message = message.replace(local, url.rstrip("/"))
        if message == str(err):
            raise
        raise InvalidInputError(message) from err.__cause__
