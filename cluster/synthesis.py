"""Models into shard workers: the one place `cluster` loads a bundle and builds the synthesizer.

Importing this module imports `synth` (torch, diffusers); the scheduler and the shard worker
do not, so only processes that really synthesize pay for it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from cytosynth import storage
from cytosynth.synth import (
    InvalidInputError,
    ModelBundle,
    SynthesisSettings,
    TileSample,
    TileSynthesizer,
    build_synthesizer,
    default_device,
    load_bundle,
    random_bundle,
    tile_seed,
)
from cytosynth.synth.models import fingerprint, localize
from cytosynth.synth.schedule import PIPELINE_DEPTH
from cytosynth.synth.selection import plan_from_json

from .job import PRECISIONS, GenerateConfig
from .worker import ShardWorker, Synthesize

# On CPU torch splits the models' reductions by thread, so pixels would depend on the thread
# count (a local run uses every core, a Ray replica its one CPU): they compute on this many
# threads everywhere. Parallelism on CPU comes from replicas (--workers), as on GPUs.
CPU_THREADS = 1


class RealTileSource:
    """Real normal tiles (folder of images or shards) as a synth normal-tile source."""

    def __init__(self, url: str) -> None:
        self.url = url
        found = storage.list_image_set(url)
        self.from_shards = found.from_shards
        self.urls = list(found.shards or found.files)
        self._count = sum(1 for _ in self._shard_images()) if self.from_shards else len(self.urls)

    def __len__(self) -> int:
        return self._count

    def check_sizes(self, tile_size: int) -> None:
        """Fail before any work if a real tile is unreadable or not tile_size x tile_size.

        Every tile is decoded whole (its bytes are read here anyway): a valid header over
        truncated or corrupt data must fail now, not after earlier shards are committed."""
        for where, (w, h) in self._sizes():
            if (w, h) != (tile_size, tile_size):
                raise InvalidInputError(f"real tile {where} is {w}x{h}, expected {tile_size}x{tile_size}")

    def _sizes(self) -> Iterator[tuple[str, tuple[int, int]]]:
        if self.from_shards:
            for i, image in enumerate(self._shard_images()):
                yield f"{i} of {self.url}", (image.shape[1], image.shape[0])
        else:
            for url in self.urls:
                image = storage.read_image(url)
                yield url, (image.shape[1], image.shape[0])

    def _shard_images(self) -> Iterator[np.ndarray]:
        return (sample["image"] for sample in storage.read_samples(self.urls))

    def __call__(self, indices: Sequence[int], seeds: Sequence[int]) -> list[np.ndarray]:
        if not self.from_shards:
            return [storage.read_image(self.urls[i]) for i in indices]
        # Shards are streamed, not indexed: skip to the batch (real sets are thousands, not millions).
        return list(itertools.islice(self._shard_images(), indices[0], indices[0] + len(indices)))


def synthesis_settings(config: GenerateConfig) -> SynthesisSettings:
    return SynthesisSettings(config.tile_size, config.steps, config.guidance, config.cells, config.class_weights)


def load_models(config: GenerateConfig) -> ModelBundle:
    """The bundle a config names: random weights for `tiny` (or when asked), else from disk/URL."""
    if config.model_dir:
        return load_bundle(config.model_dir, config.preset, config.lora, config.acs_unet, config.detector)
    if config.preset == "tiny" or config.random_weights:
        bundle = random_bundle(config.preset, seed=0)
        if config.detector:  # a local copy of a remote file; a missing local one fails in load_detector
            bundle.detector_path, bundle.detector_source = str(localize(config.detector)), config.detector
            if os.path.isfile(bundle.detector_path):
                bundle.fingerprints["detector"] = fingerprint(bundle.detector_path)
        return bundle
    raise InvalidInputError(
        f"preset {config.preset} needs --model-dir with real weights (or --random-weights for benchmarks)"
    )


def model_dtype(precision: str, device: str) -> torch.dtype:
    """The diffusion models' torch dtype: `auto` is bf16 on CUDA (the GPU's fast matmuls) and fp32
    elsewhere (CPU runs stay byte-reproducible). The detector always runs in fp32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextmanager
def reproducible_threads(device: str) -> Iterator[None]:
    """Compute on CPU_THREADS threads while on CPU (see CPU_THREADS); the caller's count after."""
    if not device.startswith("cpu"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_shard_worker(
    config: GenerateConfig,
    device: str | None = None,
    batch_size: int = 4,
    identity: dict[str, Any] | None = None,
    precision: str = "auto",
    pipeline_depth: int = PIPELINE_DEPTH,
) -> ShardWorker:
    """Load the config's models once onto `device` (None: cuda when available), in `precision`
    (see `model_dtype`), into a ShardWorker whose batches go through the two-thread pipeline
    (`synth.schedule`; `pipeline_depth` 0: every stage in series, same bytes)."""
    device = device or default_device()
    dtype = model_dtype(precision, device)
    bundle = load_models(config).to(device, dtype)
    source = RealTileSource(config.real_tiles) if config.normal_source == "real" else config.normal_source
    plan = plan_from_json(config.plan) if config.plan else None
    synthesizer = build_synthesizer(bundle, synthesis_settings(config), source, plan, device)
    synthesize = pipelined_synthesis(synthesizer, config.seed, device, pipeline_depth)
    identity = {"worker": "local", **(identity or {}), "device": device, "precision": str(dtype).removeprefix("torch.")}
    return ShardWorker(config, synthesize, bundle.fingerprints, batch_size, identity)


def pipelined_synthesis(synthesizer: TileSynthesizer, job_seed: int, device: str, depth: int = PIPELINE_DEPTH) -> Synthesize:
    """A shard worker's `synthesize`: the synthesizer's pipeline over a shard's batches, seeded
    from the job seed, on CPU_THREADS torch threads (for the CPU-stage thread too: the count is
    process-wide) until the pipeline's last thread has ended."""

    def synthesize(
        batches: Iterable[Sequence[int]], stage_seconds: MutableMapping[str, float], idle_seconds: MutableMapping[str, float]
    ) -> Iterator[list[TileSample]]:
        seeded = ((b, [tile_seed(job_seed, i) for i in b]) for b in batches)
        with reproducible_threads(device):
            yield from synthesizer.pipeline(seeded, stage_seconds, idle_seconds, depth)

    return synthesize
