"""Retry transient storage errors with exponential backoff, then fail loudly with StorageError."""

from __future__ import annotations

import errno
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from botocore.exceptions import ClientError  # botocore comes with s3fs
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, IncompleteReadError
from botocore.parsers import ResponseParserError

from .errors import StorageError, describe, redact_url, storage_error

log = logging.getLogger("cytosynth.storage")
T = TypeVar("T")

# errno values that mean "try again": s3fs maps SlowDown/503 to EBUSY and InternalError to EREMOTEIO.
_TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
_THROTTLING_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "InternalError", "ServiceUnavailable",
}
# Errors that are never worth a second try, even if an errno above matches.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class Retry:
    """How hard to try: ``attempts`` in all, sleeping ``base_delay * 2**i`` (capped, jittered)."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        # Jitter keeps many workers that failed together from retrying in lockstep.
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = Retry()


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _THROTTLING_CODES or status == 429 or status >= 500
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseParserError)):
        # Endpoint down, connect/read timeouts, dropped or garbled responses (throttling can
        # send invalid XML); credential and parameter errors are other BotoCoreErrors.
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    # s3fs' HTTP layer; an aiohttp error can only exist if aiohttp is already imported.
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, aiohttp.ClientConnectionError)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may cure: throttling, 5xx, timeouts, dropped connections.

    Follows the ``__cause__`` chain because s3fs wraps botocore errors in plain OSErrors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _PERMANENT):
            return False
        if _is_transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def retrying(
    fn: Callable[[], T],
    url: str,
    *,
    action: str = "access",
    policy: Retry = DEFAULT_RETRY,
) -> T:
    """Call ``fn()``; retry transient errors per ``policy``; raise StorageError naming ``url``.

    StorageError raised inside ``fn`` passes through untouched (it already names its URL).
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            last = attempt + 1 == policy.attempts
            if last or not is_transient(exc):
                raise storage_error(action, url, exc, attempts=attempt + 1) from exc
            wait = policy.delay(attempt)
            log.warning("retrying %s %s in %.2fs (%s)", action, redact_url(url), wait, describe(exc))
            time.sleep(wait)
    raise AssertionError("unreachable: Retry.attempts >= 1")
