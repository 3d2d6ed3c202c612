"""Finding Ray actor processes from the outside, as an operator would (to kill -9 one in tests)."""

from __future__ import annotations

import os

import psutil


def actor_processes(actor_class: str) -> list[tuple[int, str]]:
    """(pid, title) of this user's processes of Ray actors of `actor_class` (Ray titles them
    ray::<Class>.<method> while a method runs, ray::<Class> when idle)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{actor_class}") and proc.info["uids"].real == os.getuid():
            found.append((proc.info["pid"], " ".join(cmdline)))
    return found
