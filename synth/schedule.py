"""The replica's schedule: the CPU stages of one batch overlap the device stages of the next.

A batch goes stage 1 (device) -> detection (CPU: detection and cell selection) -> stage 2
(device) -> paste-back (CPU: paste-back and annotations). The calling thread runs the device
stages; one background thread runs the CPU stages in the order they are submitted. With depth
``d`` the device runs stage 1 of batch k, then stage 2 of batch k - d; with d = 1:

    device   S1(0) S1(1) S2(0) S1(2) S2(1) S1(3) S2(2) ...
    CPU            D(0)  D(1) P(0)  D(2) P(1)  D(3) ...

Between D(k)'s submission and the device's need of it (before S2(k)) the device has S2(k-1) and
S1(k+1) to run, a whole batch of device work: it waits for the CPU only where a batch's CPU work
outlasts its device work, which one CPU thread cannot hide under any order. Depth 0 runs each
CPU stage on the calling thread as soon as it is submitted: the serial order S1 D S2 P.

No byte depends on the order: every random draw of a tile comes from its own seed, and torch's
thread count is process-wide (the CPU thread computes with the caller's setting).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

PIPELINE_DEPTH = 1  # batches between stage 1 and stage 2: one hides a batch's CPU stages
# Stages fed by a queue, whose idle seconds are their waits for the stage before. Stage 1 reads
# tile indices, never waits.
WAITING_STAGES = ("detection", "stage2", "paste_back")

B = TypeVar("B")  # what a stage hands on: a batch in progress
R = TypeVar("R")  # a batch's result


@dataclass
class StageClock:
    """Busy and idle seconds per stage. The device thread and the CPU thread each write only
    their own stages' keys (single dict stores under the GIL), so there is no lock."""

    busy: MutableMapping[str, float] = field(default_factory=dict)
    idle: MutableMapping[str, float] = field(default_factory=dict)

    @contextmanager
    def timing(self, stage: str, of: str = "busy") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start, of)

    def add(self, stage: str, seconds: float, of: str = "busy") -> None:
        seconds_of = self.busy if of == "busy" else self.idle
        seconds_of[stage] = seconds_of.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class Stages(Generic[B, R]):
    """The four stages of a batch; each takes what the one before returned."""

    stage1: Callable[[Any], B]  # device: a batch's input -> its normal tiles
    detection: Callable[[B], B]  # CPU
    stage2: Callable[[B], B]  # device
    paste_back: Callable[[B], R]  # CPU


def pipelined(
    batches: Iterable[Any], stages: Stages[B, R], clock: StageClock, depth: int = PIPELINE_DEPTH
) -> Iterator[R]:
    """Each batch's result, in batch order, on the schedule of the module docstring. A stage's
    error is raised here, after every started CPU stage has ended: no thread outlives the call."""
    cpu = _CpuThread(clock) if depth > 0 else _Inline(clock)
    planned: deque[Future[B]] = deque()  # detections of batches awaiting stage 2
    pasting: deque[Future[R]] = deque()  # results in batch order
    try:
        for batch in batches:
            while pasting and pasting[0].done():
                yield pasting.popleft().result()
            with clock.timing("stage1"):
                tiles = stages.stage1(batch)
            planned.append(cpu.submit("detection", stages.detection, tiles))
            if len(planned) > depth:
                pasting.append(_stage2(planned.popleft(), stages, cpu, clock))
        while planned:
            pasting.append(_stage2(planned.popleft(), stages, cpu, clock))
        while pasting:
            yield pasting.popleft().result()
    finally:
        cpu.close()


def _stage2(detected: Future[B], stages: Stages[B, R], cpu: _CpuThread | _Inline, clock: StageClock) -> Future[R]:
    with clock.timing("stage2", of="idle"):
        batch = detected.result()
    with clock.timing("stage2"):
        edited = stages.stage2(batch)
    return cpu.submit("paste_back", stages.paste_back, edited)


class _CpuThread:
    """The CPU stages' thread: tasks run in submission order, and the time the thread sat
    waiting before a task counts as that task's stage's idle time (it waited for its input)."""

    def __init__(self, clock: StageClock) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cpu-stages")
        self._clock, self._free_since = clock, time.perf_counter()

    def submit(self, stage: str, fn: Callable[[Any], Any], arg: Any) -> Future[Any]:
        return self._pool.submit(self._run, stage, fn, arg)

    def _run(self, stage: str, fn: Callable[[Any], Any], arg: Any) -> Any:
        self._clock.add(stage, time.perf_counter() - self._free_since, of="idle")
        try:
            with self._clock.timing(stage):
                return fn(arg)
        finally:
            self._free_since = time.perf_counter()

    def close(self) -> None:
        """Drop what has not started; wait for what has."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Inline:
    """Depth 0: a CPU stage runs at once on the calling thread (its error is raised at once)."""

    def __init__(self, clock: StageClock) -> None:
        self._clock = clock

    def submit(self, stage: str, fn: Callable[[Any], Any], arg: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._clock.timing(stage):
            future.set_result(fn(arg))
        return future

    def close(self) -> None:
        pass
