"""How a job fails, in words that survive Ray: user errors, stopped jobs, the error out of Ray's wrappers.

Ray-free (the CLI imports it to map errors to exit codes without loading Ray); the Ray code of
this package raises and unwraps with it.
"""

from __future__ import annotations

from cytosynth.storage.errors import StorageError
from cytosynth.synth.errors import InvalidInputError

REPLICA_TIMEOUT = 30 * 60.0  # default --replica-timeout: seconds a Ray pool may have no replica up before the job stops
# Errors of the user's input, wherever they are raised (driver, replica, training worker): the
# CLI prints them as one line and exits 2.
USER_ERRORS = (InvalidInputError, StorageError)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def raised_error(err: BaseException) -> BaseException:
    """The exception a replica's or training worker's own code raised, out of Ray's wrappers
    (a RayTaskError holds it as `cause`, Ray Train's UserExceptionWithTraceback as `_base_exc`),
    so that a user error (USER_ERRORS) raised in a replica reads as in a local run."""
    seen, current = set(), err
    while id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "_base_exc", None) or getattr(current, "cause", None)
        if inner is None and not isinstance(current, USER_ERRORS):  # a user error's own cause stays inside it
            inner = current.__cause__
        if not isinstance(inner, BaseException):
            break
        current = inner
    return current


class JobStoppedError(RuntimeError):
    """The job stopped before its end for a reason outside its input (its own Ray died, no
    replica could be placed in time). Committed shards are kept: re-running the same command
    resumes. The message is one line; the CLI exits EXIT_STOPPED."""
