"""The `cytosynth` command. Each job module registers its own subcommands.

This is the boundary where messages leave the process: everything the command writes to stdout
and stderr (error lines, summaries, progress and log lines) passes through one redaction (URL
userinfo, credentials from the environment). An unexpected error prints one line and the path of
a private log file holding its (redacted) traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from cytosynth import storage
from cytosynth.cluster.failures import USER_ERRORS, JobStoppedError
from cytosynth.storage.errors import redact_text, url_secrets

from .common import quiet_libraries

# Modules under cytosynth.jobs with a `register(commands)` function; each sets `run` on its parsers.
JOB_MODULES = ("generate", "verify", "detection", "fid", "finetune_normal", "finetune_abnormal", "train_detector", "export")
EXIT_USER_ERROR, EXIT_UNEXPECTED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by its surroundings (its Ray died, no replica in time); re-run resumes
_MAX_LINE_CHARS = 500


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, schedulers) ends a job the way Ctrl-C does: replicas released, resumable."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cytosynth", description="Two-stage cervical cytology tile synthesis.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in JOB_MODULES:
        importlib.import_module(f"cytosynth.jobs.{name}").register(commands)
    return parser


class RedactingStream:
    """A text stream that writes everything through `redact_text` (tqdm, print, logging alike)."""

    def __init__(self, stream: TextIO, secrets: set[str]) -> None:
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text, self._secrets))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def process_secrets(argv: Sequence[str]) -> set[str]:
    """What no output may show: URL userinfo in the arguments, credential values in the environment."""
    env = {v for k, v in os.environ.items() if storage.is_secret_name(k) and not k.endswith(("_FILE", "_PATH"))}
    return url_secrets(argv) | env


@contextmanager
def redacted_output(secrets: set[str]) -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout, secrets), RedactingStream(sys.stderr, secrets)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


_sigterm_received: list[bool] = []  # set by the handler: Ray's blocking calls re-raise a plain KeyboardInterrupt


def _raise_terminated(signum: int, frame: Any) -> None:
    _sigterm_received.append(True)
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` in the main thread (cluster code keeps
    this handler across ray.init, which would install its own `sys.exit`)."""
    _sigterm_received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (the CLI called from a worker thread): leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_LINE_CHARS else text[: _MAX_LINE_CHARS - 3] + "..."


def log_unexpected(err: BaseException, secrets: set[str]) -> str:
    """Write the traceback (redacted) to a new private log file; its path."""
    fd, path = tempfile.mkstemp(prefix="cytosynth-error-", suffix=".log")  # mode 0600
    with os.fdopen(fd, "w") as fh:
        fh.write(redact_text("".join(traceback.format_exception(err)), secrets))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    secrets = process_secrets(argv)
    with redacted_output(secrets), sigterm_as_interrupt():
        args = build_parser().parse_args(argv)
        quiet_libraries()
        try:
            return args.run(args)
        except USER_ERRORS as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except JobStoppedError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_STOPPED
        except KeyboardInterrupt as err:
            if isinstance(err, Terminated) or _sigterm_received:
                print("error: terminated (SIGTERM); finished work is kept, re-run the same command to resume", file=sys.stderr)
                return EXIT_TERMINATED
            print("error: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - the boundary: one line, the traceback in a file
            path = log_unexpected(err, secrets)
            print(f"error: {type(err).__name__}: {one_line(err) or '(no message)'} (traceback in {path})", file=sys.stderr)
            return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
