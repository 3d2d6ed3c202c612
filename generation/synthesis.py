"""Models into shard makers: the one place a job loads a bundle and builds the synthesizer.

Importing this module imports `synth` (torch, diffusers); the scheduler and the shard maker
do not, so only processes that really synthesize pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from cytosynth import storage
from cytosynth.synth import (
    InvalidInputError,
    ModelBundle,
    TileSample,
    TileSynthesizer,
    build_synthesizer,
    default_device,
    load_bundle,
    random_bundle,
    tile_seed,
)
from cytosynth.synth.devices import model_dtype
from cytosynth.synth.models import fingerprint, localize
from cytosynth.synth.schedule import PIPELINE_DEPTH
from cytosynth.synth.edit_plan import Plan

from .generate_config import GenerateConfig
from .real_tiles import RealTileSource
from .shard_maker import ShardMaker, Synthesize

# On CPU torch splits the models' reductions by thread, so pixels would depend on the thread
# count (a local run uses every core, a Ray replica its one CPU): they compute on this many
# threads everywhere. Parallelism on CPU comes from replicas (--workers), as on GPUs.
CPU_THREADS = 1


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


def load_shard_maker(
    config: GenerateConfig,
    device: str | None = None,
    batch_size: int = 4,
    identity: dict[str, Any] | None = None,
    precision: str = "auto",
    pipeline_depth: int = PIPELINE_DEPTH,
    plan: Plan | None = None,
) -> ShardMaker:
    """Load the config's models once onto `device` (None: cuda when available), in `precision`
    (see `model_dtype`), into a ShardMaker whose batches go through the two-thread pipeline
    (`synth.schedule`; `pipeline_depth` 0: every stage in series, same bytes)."""
    device = device or default_device()
    dtype = model_dtype(precision, device)
    bundle = load_models(config).to(device, dtype)
    # The job's index of its real tiles (runner.prepare_job wrote it), read on first use.
    real = config.normal_source == "real"
    source = RealTileSource(storage.real_index_url(config.out), config.synthesis.tile_size) if real else config.normal_source
    if bool(config.plan) != (plan is not None):  # the driver parsed config.plan (runner.read_plan)
        raise ValueError("load_shard_maker needs the config's plan parsed: plan=runner.read_plan(config)")
    synthesizer = build_synthesizer(bundle, config.synthesis, source, plan, device)
    synthesize = pipelined_synthesis(synthesizer, config.seed, device, pipeline_depth)
    identity = {"replica": "local", **(identity or {}), "device": device, "precision": str(dtype).removeprefix("torch.")}
    return ShardMaker(config, synthesize, bundle.fingerprints, batch_size, identity)


def pipelined_synthesis(synthesizer: TileSynthesizer, job_seed: int, device: str, depth: int = PIPELINE_DEPTH) -> Synthesize:
    """A shard maker's `synthesize`: the synthesizer's pipeline over a shard's batches, seeded
    from the job seed, on CPU_THREADS torch threads (for the CPU-stage thread too: the count is
    process-wide) until the pipeline's last thread has ended."""

    def synthesize(
        batches: Iterable[Sequence[int]], stage_seconds: MutableMapping[str, float], idle_seconds: MutableMapping[str, float]
    ) -> Iterator[list[TileSample]]:
        seeded = ((b, [tile_seed(job_seed, i) for i in b]) for b in batches)
        with reproducible_threads(device):
            yield from synthesizer.pipeline(seeded, stage_seconds, idle_seconds, depth)

    return synthesize
