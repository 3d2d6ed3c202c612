"""The generate job: validate, write job.json, run the missing shards, then finalize the dataset.

`run_job` is the one skeleton; a `ShardExecutor` is what runs the shards: `LocalExecutor` in this
process (`run_local`), `cluster.distributed.RayExecutor` on a pool of Ray replicas. So checks,
resume and the output contract are the same wherever the shards run.
Neither holds per-tile state for the whole job: shards are listed lazily, shard stats are tallied
as they arrive, and the manifest is streamed from the committed shards.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.synth import InvalidInputError
from cytosynth.synth.edit_plan import Plan, plan_from_json

from .generate_config import NORMAL_SOURCES, GenerateConfig, JobLayout, PendingShards, job_config
from .real_tiles import RealTileSource, check_header_sizes, real_tile_index, sample_positions
from .shard_maker import IDLE_STAGES, STAGES


@dataclass(frozen=True)
class Runtime:
    """How to run: device (None: cuda where available), tiles per model call, progress bar, and
    the models' precision (`synthesis.model_dtype`). Like the device, precision changes pixels at
    the rounding level (so, on generated tiles, what the detector may find), not the job's
    identity: shard stats record both. `verify`: on resume, hash every committed tar against its
    marker (sizes are always compared). `check_real_tiles`: decode that many real tiles, spread
    over the job, before anything is written (header sizes are always checked)."""

    device: str | None = None
    batch_size: int = 4
    progress: bool = True
    precision: str = "auto"
    verify: bool = False
    check_real_tiles: int = 0


@dataclass
class RunTally:
    """What this run did, added up shard by shard as results arrive (O(replicas) memory)."""

    shards: int = 0
    tiles: int = 0
    retried_shards: int = 0
    stage_seconds: Counter[str] = field(default_factory=Counter)
    idle_seconds: Counter[str] = field(default_factory=Counter)
    replicas: set[str] = field(default_factory=set)

    def add(self, stats: Mapping[str, Any]) -> None:
        self.shards += 1
        self.tiles += stats["tiles"]
        self.retried_shards += stats.get("attempt", 1) > 1
        self.stage_seconds.update(stats.get("stage_seconds", {}))
        self.idle_seconds.update(stats.get("idle_seconds", {}))
        self.replicas.add(stats.get("replica", "local"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "tiles": self.tiles,
            "replicas": len(self.replicas),
            "retried_shards": self.retried_shards,
            "stage_seconds": {s: round(self.stage_seconds.get(s, 0.0), 2) for s in STAGES},
            "idle_seconds": {s: round(self.idle_seconds.get(s, 0.0), 2) for s in IDLE_STAGES},
        }


def validate_runtime(runtime: Runtime) -> None:
    """Runtime choices that are wrong whatever the data: one line, before anything is written."""
    if runtime.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {runtime.batch_size}")
    if runtime.check_real_tiles < 0:
        raise InvalidInputError(f"--check-real-tiles must be at least 0, got {runtime.check_real_tiles}")


def validate_options(config: GenerateConfig) -> None:
    """The options, each in its range, before job.json exists (the synthesis settings check their
    own: `SynthesisSettings.validate`)."""
    if (config.lora or config.acs_unet) and not config.model_dir:  # they would be silently ignored
        raise InvalidInputError("--lora and --acs-unet replace parts of a --model-dir bundle; give --model-dir "
                                "(without it the preset's random-init models are used as a whole)")
    if config.seed < 0 or config.seed >= 2**63:
        raise InvalidInputError(f"--seed must be in [0, 2^63), got {config.seed}")
    config.synthesis.validate()


def read_plan(config: GenerateConfig) -> Plan | None:
    """The job's plan, parsed here once: the checks and every replica take this object."""
    return plan_from_json(config.plan) if config.plan else None


def validate_config(config: GenerateConfig, plan: Plan | None, real: storage.ImageIndex | None = None) -> JobLayout:
    """Check every input a job can check up front; returns the job's shard layout. `plan`: the
    config's (`read_plan`); `real`: the index of the real tiles when the caller has made it (else
    made here, `real_tile_index`)."""
    validate_options(config)
    if config.normal_source not in NORMAL_SOURCES:
        raise InvalidInputError(f"unknown normal source {config.normal_source!r}; choose one of {', '.join(NORMAL_SOURCES)}")
    if config.image_format not in storage.IMAGE_FORMATS:
        raise InvalidInputError(f"unknown image format {config.image_format!r}; choose one of {', '.join(storage.IMAGE_FORMATS)}")
    if config.tiles_per_shard < 1:
        raise InvalidInputError("--tiles-per-shard must be at least 1")
    num_tiles = config.num_tiles
    if config.normal_source == "real":
        if not config.real_tiles:
            raise InvalidInputError("--normal-source real needs --real-tiles URL")
        real = real or real_tile_index(config)
        if num_tiles is None:
            num_tiles = len(real)
        elif num_tiles > len(real):
            raise InvalidInputError(f"--num-tiles {num_tiles} but {config.real_tiles} holds {len(real)} real tiles")
        check_header_sizes(real, config.synthesis.tile_size)
    if num_tiles is None or num_tiles < 1:
        raise InvalidInputError("--num-tiles must be at least 1")
    if plan is not None:
        plan.validate(config.synthesis.tile_size, num_tiles)
    return JobLayout(num_tiles, config.tiles_per_shard)


def check_decoded_real_tiles(config: GenerateConfig, real: storage.ImageIndex, layout: JobLayout, count: int) -> None:
    """Decode `count` of the job's real tiles (spread evenly) as a replica would: a cut or
    corrupt tile among them fails here, before anything is written."""
    source = RealTileSource(storage.real_index_url(config.out), config.synthesis.tile_size, real)
    for i in sample_positions(layout.num_tiles, count):
        source.read(i)


def store_real_index(config: GenerateConfig, real: storage.ImageIndex | None) -> None:
    """Keep the real tiles' index in the output, where every replica reads it (a resume finds
    the one it was made with, `real_tile_index`, and leaves it)."""
    url = storage.real_index_url(config.out)
    if real is not None and not storage.exists(url):
        storage.write_image_index(real, url)


def prepare_job(
    config: GenerateConfig,
    layout: JobLayout,
    fingerprints: dict[str, str],
    *,
    hash_tars: bool = False,
    real: storage.ImageIndex | None = None,
) -> PendingShards:
    """Claim --out (write or match job.json), store the real tiles' index (`real`), take damaged
    committed shards back out so they are made again, and list the shards still to do.

    Damaged: the tar is missing or not the size its marker records, or (`hash_tars`) not its
    SHA-256. A committed shard made under another job config is a one-line StorageError.
    """
    record = job_config(config, layout, fingerprints)
    storage.write_job_json(config.out, record)
    store_real_index(config, real)  # after the config check: a refused run changes nothing
    damaged = storage.damaged_shards(config.out, hash_tars=hash_tars, config_sha256=storage.config_sha256(record))
    for index, problem in damaged.items():
        tqdm.write(f"cytosynth: shard {storage.shard_name(index)} is damaged ({problem}); making it again", file=sys.stderr)
    storage.uncommit(config.out, damaged)
    committed = storage.committed_shards(config.out)
    return PendingShards(layout, frozenset(s for s in committed if s < layout.num_shards))


def finalize_job(
    config: GenerateConfig, layout: JobLayout, seconds: float, run: RunTally | None = None
) -> dict[str, Any]:
    """Manifest, preview and `_SUCCESS` (last, only when every shard is committed); the summary.

    The dataset's totals are added up while the manifest streams through the shard stats (one
    pass, no per-tile state). A job that was already complete changes nothing (no new manifest,
    preview or `_SUCCESS`): `_SUCCESS` exists only once every shard was committed, so this run
    did no work.
    """
    this_run = {"seconds": round(seconds, 2), "this_run": (run or RunTally()).as_dict()}
    if storage.is_complete(config.out):
        return {**json.loads(storage.get_bytes(storage.join(config.out, "_SUCCESS"))), "out": config.out, **this_run}
    totals = DatasetTotals()
    stats = storage.iter_shard_stats(config.out, config_sha256=storage.job_config_sha256(config.out))
    storage.write_manifest(config.out, stats=totals.counting(stats))
    summary = {"out": config.out, **totals.as_dict(), **this_run}
    storage.write_preview(config.out)
    # Every shard is committed, so no writer of this job is left: what a killed one left goes.
    storage.remove_temp_files(config.out)
    storage.write_success(config.out, summary, expected_shards=layout.num_shards)
    return summary


@dataclass
class DatasetTotals:
    """Tiles, shards and cells of a whole dataset, counted from its committed shard stats."""

    tiles: int = 0
    shards: int = 0
    normal_cells: int = 0
    cells: Counter[str] = field(default_factory=Counter)

    def counting(self, stats: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """Pass `stats` through unchanged, counting each shard on the way."""
        for shard in stats:
            self.tiles += shard["tiles"]
            self.shards += 1
            self.normal_cells += shard["normal_cells"]
            self.cells.update(shard["cells"])
            yield shard

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiles": self.tiles,
            "shards": self.shards,
            "cells": {c: self.cells.get(c, 0) for c in storage.CLASSES},
            "normal_cells": self.normal_cells,
        }


class ShardExecutor(Protocol):
    """Runs a job's shards: its own checks, its models started, then every pending shard."""

    def check(self) -> None:
        """What is wrong with how to run, whatever the data: one line, before anything is written."""

    def started(self, config: GenerateConfig, layout: JobLayout, plan: Plan | None) -> AbstractContextManager[dict[str, str]]:
        """Load the models (and start what runs them, with the parsed `plan`) for the block;
        yields their fingerprints."""

    def run(self, pending: PendingShards, layout: JobLayout, bar: tqdm, tally: Callable[[dict[str, Any]], None]) -> None:
        """Synthesize and commit every pending shard, passing each one's stats to `tally`."""


def run_job(config: GenerateConfig, runtime: Runtime, executor: ShardExecutor) -> dict[str, Any]:
    """Run a whole job, resuming where a previous run stopped: every check before anything is
    written, the models before job.json (it records their fingerprints), the shards, then
    manifest, preview and `_SUCCESS`."""
    start = time.perf_counter()
    validate_runtime(runtime)
    executor.check()
    validate_options(config)  # the cheap checks first: nothing below may write before they pass
    storage.ensure_writable(config.out)  # first: an unreachable store is one 'not writable' line
    storage.check_not_foreign(config.out)
    real = real_tile_index(config) if config.normal_source == "real" and config.real_tiles else None
    plan = read_plan(config)
    layout = validate_config(config, plan, real)  # checks inputs before the (possibly slow) model load
    if real is not None:
        check_decoded_real_tiles(config, real, layout, runtime.check_real_tiles)
    run = RunTally()
    with executor.started(config, layout, plan) as fingerprints:
        pending = prepare_job(config, layout, fingerprints, hash_tars=runtime.verify, real=real)
        with tqdm(
            total=layout.num_tiles, initial=pending.done_tiles, unit="tile", disable=not runtime.progress, desc="generate"
        ) as bar:
            executor.run(pending, layout, bar, run.add)
    return finalize_job(config, layout, time.perf_counter() - start, run)


@dataclass
class LocalExecutor:
    """Every shard in this process, on one model replica."""

    runtime: Runtime
    maker: Any = None  # the ShardMaker, once started

    def check(self) -> None:
        pass

    @contextmanager
    def started(self, config: GenerateConfig, layout: JobLayout, plan: Plan | None) -> Iterator[dict[str, str]]:
        from .synthesis import load_shard_maker  # torch, diffusers: only where the models run

        r = self.runtime
        self.maker = load_shard_maker(config, r.device, r.batch_size, precision=r.precision, plan=plan)
        yield self.maker.fingerprints

    def run(self, pending: PendingShards, layout: JobLayout, bar: tqdm, tally: Callable[[dict[str, Any]], None]) -> None:
        for shard in pending:
            tally(self.maker.run(shard, layout, on_tiles=bar.update))


def run_local(config: GenerateConfig, runtime: Runtime = Runtime()) -> dict[str, Any]:
    """Run a whole job in this process (one model replica), resuming where a previous run stopped."""
    return run_job(config, runtime, LocalExecutor(runtime))
