"""The shard maker: synthesizes the tiles of a shard batch by batch and commits the shard.

It knows nothing of Ray or of models: `synthesize` is any callable from a shard's batches of tile
indices to a stream of samples, one list per batch (`generation.synthesis.load_shard_maker` wires
the real models in, whose detection and paste-back of one batch run beside the diffusion of the
next: `synth.schedule`; benchmarks pass a simulated one). The local runner calls it in-process,
Ray actors wrap it. The shard is the unit of work and of commit.

Encoding and upload are kept off the accelerator's critical path with threads in the same
process: Pillow's zlib/libjpeg encoders and the storage clients release the GIL, so a batch's PNGs
are encoded while the next batch synthesizes, and a finished shard uploads while the next shard
(the replica's second in-flight one) synthesizes. Threads need no copies of the images through
Ray's object store and no extra scheduling, which is why they were picked over Ray CPU tasks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cytosynth import storage

from .generate_config import GenerateConfig, JobLayout, job_config

# Per-shard stage seconds: the synthesis stages (synth.pipeline.SYNTHESIS_STAGES) plus PNG/JPEG
# encoding and the upload of the shard. Encode seconds are summed over the encoder threads.
STAGES = ("stage1", "detection", "stage2", "paste_back", "encode", "upload")
# Per-shard idle seconds: how long each queue-fed synthesis stage waited for the stage before
# (synth.schedule.WAITING_STAGES; stage2's is the device waiting for the CPU).
IDLE_STAGES = ("detection", "stage2", "paste_back")
ENCODE_THREADS = 2


class Sample(Protocol):
    tile_index: int
    image: np.ndarray
    annotation: dict[str, Any]


# (a shard's batches of tile indices, stage seconds and idle seconds to add to) -> per batch, in
# order, one sample per index. The maker closes the stream, so a generator's threads end with it.
Synthesize = Callable[
    [Iterable[Sequence[int]], MutableMapping[str, float], MutableMapping[str, float]], Iterator[Sequence[Sample]]
]


@dataclass
class ShardMaker:
    """`run(shard)` synthesizes and commits one shard; safe to call from two threads at once
    (one synthesizes while the other finishes encoding and uploading)."""

    config: GenerateConfig
    synthesize: Synthesize
    fingerprints: dict[str, str]
    batch_size: int = 4
    identity: dict[str, Any] = field(default_factory=lambda: {"replica": "local"})  # written to shard stats

    def __post_init__(self) -> None:
        self._device = threading.Lock()  # one shard at a time synthesizes
        self._encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="encode")

    def run(
        self, shard: int, layout: JobLayout, attempt: int = 1, on_tiles: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """Synthesize every tile of `shard`, encode and commit it; returns the shard's stats.

        The committed stats JSON holds every stage but `upload` (the JSON is the commit marker,
        written after the tar); the returned stats add `upload` and `finished_at`.
        """
        c = self.config
        job_sha256 = storage.config_sha256(job_config(c, layout, self.fingerprints))
        writer = storage.ShardWriter(c.out, shard, c.image_format, config_sha256=job_sha256)
        seconds, idle = dict.fromkeys(STAGES, 0.0), dict.fromkeys(IDLE_STAGES, 0.0)
        started_at = time.time()
        encodes: list[Future[float]] = []
        try:
            batches = _batched(layout.tiles(shard), self.batch_size)
            with self._device, closing(self.synthesize(batches, seconds, idle)) as stream:
                for samples in stream:
                    encodes += [self._encoder.submit(_encode, writer, s) for s in samples]
                    if on_tiles:
                        on_tiles(len(samples))
            # The device is free: the next shard synthesizes while this one encodes and uploads.
            seconds["encode"] = sum(f.result() for f in encodes)
        except BaseException:
            for f in encodes:
                f.cancel()
            raise
        extra = {**self.identity, "attempt": attempt, "started_at": round(started_at, 3)}
        upload_start = time.perf_counter()
        stage_seconds = _rounded({k: v for k, v in seconds.items() if k != "upload"})
        times = {"stage_seconds": stage_seconds, "idle_seconds": _rounded(idle)}
        stats = writer.commit({**extra, **times}, tiles=layout.tiles(shard))
        seconds["upload"] = time.perf_counter() - upload_start
        return {**stats, "stage_seconds": _rounded(seconds), "finished_at": round(time.time(), 3)}


def _encode(writer: storage.ShardWriter, sample: Sample) -> float:
    """Encode one sample into the shard; returns the seconds it took. Threads add distinct tiles."""
    start = time.perf_counter()
    writer.add(sample.tile_index, sample.image, sample.annotation)
    return time.perf_counter() - start


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in seconds.items()}


def _batched(items: range, size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
