"""Finding Ray actor processes from the outside, as an operator would (to kill -9 one in tests)."""

from __future__ import annotations

import psutil


def actor_processes(actor_class: str) -> list[tuple[int, str]]:
    """(pid, title) of the processes of Ray actors of `actor_class` that descend from this process
    (a Ray started here, or by a driver started here): never another session's on a shared
    machine. Ray titles them ray::<Class>.<method> while a method runs, ray::<Class> when idle."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:  # gone meanwhile
            continue
        if cmdline and cmdline[0].startswith(f"ray::{actor_class}"):
            found.append((proc.pid, " ".join(cmdline)))
    return found
