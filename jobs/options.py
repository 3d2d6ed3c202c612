"""From parsed options to a config dataclass, by field name: a setting is then written once, as
a field (its default included), and once more as its option's help in the job's parser.

    config = from_args(GenerateConfig, args, plan=read_plan(args.plan))
    gen.add_argument("--steps", type=int, default=SETTINGS.steps, help="DDIM steps (paper: 25)")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import MISSING, fields, is_dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

C = TypeVar("C")

# The fields whose option is their negation: the field says what the code does, the flag what a
# user turns off.
NEGATED = {"resume": "no_resume", "progress": "quiet"}


def absolute(url: str | None) -> str | None:
    """Local paths made absolute: Ray workers do not run in the driver's working directory."""
    return url if url is None or "://" in url else os.path.abspath(url)


def from_args(cls: type[C], args: argparse.Namespace, *, paths: Iterable[str] = (), **values: Any) -> C:
    """A `cls` whose fields come from the options of the same name (those of NEGATED inverted),
    `paths` made absolute; `values` set the rest (computed, or from options named otherwise).
    A field that is itself a config (GenerateConfig.synthesis) is built from the same options.
    A field with no option keeps its default: tests/test_cli_configs.py checks that each field
    a user can set has its option."""
    given = {}
    for f in fields(cls):
        if is_dataclass(f.default_factory):
            given[f.name] = from_args(f.default_factory, args)
        elif f.name in NEGATED and hasattr(args, NEGATED[f.name]):
            given[f.name] = not getattr(args, NEGATED[f.name])
        elif hasattr(args, f.name):
            given[f.name] = getattr(args, f.name)
    for name in paths:
        given[name] = absolute(given[name])
    return cls(**{**given, **values})


def field_defaults(cls: type) -> SimpleNamespace:
    """`cls`'s defaults by field name, for the parsers' `default=`."""
    return SimpleNamespace(**{f.name: f.default for f in fields(cls) if f.default is not MISSING})
