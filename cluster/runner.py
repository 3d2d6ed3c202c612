"""Job runners: validate, write job.json, run the missing shards, then finalize the dataset.

`run_local` runs every shard in this process. Whatever runs the shards, a job starts with
`prepare_job` and ends with `finalize_job`, so resume and the output contract are the same.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.synth import ABNORMAL_CLASSES, InvalidInputError
from cytosynth.synth.selection import plan_from_json

from .worker import NORMAL_SOURCES, GenerateConfig, JobLayout, RealTileSource, ShardWorker


@dataclass(frozen=True)
class Runtime:
    """How to run (never changes the data): device, tiles per model call, progress bar."""

    device: str = "cpu"
    batch_size: int = 4
    progress: bool = True


def validate_config(config: GenerateConfig) -> JobLayout:
    """Check every input a job can check up front; returns the job's shard layout."""
    if config.normal_source not in NORMAL_SOURCES:
        raise InvalidInputError(f"unknown normal source {config.normal_source!r}; choose one of {', '.join(NORMAL_SOURCES)}")
    if config.image_format not in storage.IMAGE_FORMATS:
        raise InvalidInputError(f"unknown image format {config.image_format!r}; choose one of {', '.join(storage.IMAGE_FORMATS)}")
    if config.tiles_per_shard < 1:
        raise InvalidInputError("--tiles-per-shard must be at least 1")
    if config.tile_size % 8 or config.tile_size < 256:
        raise InvalidInputError(f"tile size must be a multiple of 8 and at least 256, got {config.tile_size}")
    num_tiles = config.num_tiles
    if config.normal_source == "real":
        if not config.real_tiles:
            raise InvalidInputError("--normal-source real needs --real-tiles URL")
        real = RealTileSource(config.real_tiles)
        if num_tiles is None:
            num_tiles = len(real)
        elif num_tiles > len(real):
            raise InvalidInputError(f"--num-tiles {num_tiles} but {config.real_tiles} holds {len(real)} real tiles")
        real.check_sizes(config.tile_size)
    if num_tiles is None or num_tiles < 1:
        raise InvalidInputError("--num-tiles must be at least 1")
    if config.plan:
        plan_from_json(config.plan).validate(config.tile_size, num_tiles)
    return JobLayout(num_tiles, config.tiles_per_shard)


def prepare_job(config: GenerateConfig, layout: JobLayout, fingerprints: dict[str, str]) -> list[int]:
    """Write (or match) job.json, and list the shards still to do."""
    record = {**config.record(), "num_tiles": layout.num_tiles, "models": fingerprints}
    storage.write_job_json(config.out, record)
    done = storage.committed_shards(config.out)
    return [s for s in range(layout.num_shards) if s not in done]


def finalize_job(config: GenerateConfig, layout: JobLayout, seconds: float) -> dict[str, Any]:
    """Manifest, preview and `_SUCCESS` (last, only when every shard is committed); the summary.

    A job that was already complete changes nothing (no new manifest, preview or `_SUCCESS`):
    `_SUCCESS` exists only once every shard was committed, so this run did no work.
    """
    if storage.is_complete(config.out):
        return {**json.loads(storage.get_bytes(storage.join(config.out, "_SUCCESS"))), "out": config.out}
    stats = list(storage.iter_shard_stats(config.out))
    cells: Counter[str] = Counter()
    for shard in stats:
        cells.update(shard["cells"])
    summary = {
        "out": config.out,
        "tiles": sum(s["tiles"] for s in stats),
        "shards": len(stats),
        "cells": {c: cells.get(c, 0) for c in ABNORMAL_CLASSES},
        "normal_cells": sum(s["normal_cells"] for s in stats),
        "seconds": round(seconds, 2),
    }
    storage.write_manifest(config.out)
    storage.write_preview(config.out)
    storage.write_success(config.out, summary, expected_shards=layout.num_shards)
    return summary


def run_local(config: GenerateConfig, runtime: Runtime = Runtime()) -> dict[str, Any]:
    """Run a whole job in this process (one model replica), resuming where a previous run stopped."""
    start = time.perf_counter()
    storage.ensure_writable(config.out)
    layout = validate_config(config)  # checks inputs before the (possibly slow) model load
    worker = ShardWorker(config, runtime.device, runtime.batch_size)
    todo = prepare_job(config, layout, worker.bundle.fingerprints)
    done_tiles = layout.num_tiles - sum(len(layout.tiles(s)) for s in todo)
    with tqdm(
        total=layout.num_tiles, initial=done_tiles, unit="tile", disable=not runtime.progress, desc="generate"
    ) as bar:
        for shard in todo:
            worker.run(shard, layout, on_tiles=bar.update)
    return finalize_job(config, layout, time.perf_counter() - start)
