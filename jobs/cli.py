"""The `cytosynth` command. Each job module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cytosynth import storage
from cytosynth.synth import InvalidInputError

from .common import quiet_libraries

# Modules under cytosynth.jobs with a `register(commands)` function; each sets `run` on its parsers.
JOB_MODULES = ("generate", "detection", "fid", "finetune_normal", "finetune_abnormal", "train_detector", "export")
USER_ERRORS = (InvalidInputError, storage.StorageError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cytosynth", description="Two-stage cervical cytology tile synthesis.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in JOB_MODULES:
        importlib.import_module(f"cytosynth.jobs.{name}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
