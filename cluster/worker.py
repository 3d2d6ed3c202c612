"""The shard worker: models loaded once, then one shard at a time synthesized and committed.

It joins `synth` (the science) and `storage` (the bytes) and knows nothing of Ray: the local
runner calls it in-process, Ray actors wrap it. The shard is the unit of work and of commit.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cytosynth import storage
from cytosynth.synth import (
    InvalidInputError,
    ModelBundle,
    SynthesisSettings,
    TileSynthesizer,
    build_synthesizer,
    load_bundle,
    random_bundle,
    tile_seed,
)
from cytosynth.synth.models import fingerprint
from cytosynth.synth.selection import plan_from_json

NORMAL_SOURCES = ("diffusion", "phantom", "real")


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that defines a dataset. Written to job.json; a resume must match it exactly.

    Runtime choices that do not change the data (device, batch size, workers) live elsewhere.
    """

    out: str
    num_tiles: int | None = None  # None: as many as there are real tiles
    preset: str = "tiny"
    model_dir: str | None = None
    random_weights: bool = False
    lora: str | None = None
    acs_unet: str | None = None
    detector: str | None = None
    normal_source: str = "diffusion"
    real_tiles: str | None = None
    cells: tuple[int, int] = (1, 8)
    class_weights: dict[str, float] | None = None
    seed: int = 0
    tiles_per_shard: int = 64
    plan: str | None = None  # the plan's JSON text (a file is read by the CLI)
    image_format: str = "png"
    tile_size: int = 1024
    steps: int = 25
    guidance: float = 5.0

    @property
    def settings(self) -> SynthesisSettings:
        return SynthesisSettings(self.tile_size, self.steps, self.guidance, self.cells, self.class_weights)

    def record(self) -> dict[str, Any]:
        """The job.json form: the plan by hash (it can be large), no output URL (it is the key)."""
        data = asdict(self)
        data.pop("out")
        if self.plan is not None:
            data["plan"] = "sha256:" + hashlib.sha256(self.plan.encode()).hexdigest()[:16]
        return data


@dataclass
class JobLayout:
    """Which tiles go in which shard: tiles [s*K, (s+1)*K) in shard s."""

    num_tiles: int
    tiles_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_tiles // self.tiles_per_shard)

    def tiles(self, shard: int) -> range:
        start = shard * self.tiles_per_shard
        return range(start, min(start + self.tiles_per_shard, self.num_tiles))


class RealTileSource:
    """Real normal tiles (folder of images or shards) as a synth normal-tile source."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.urls = storage.list_real_tiles(url)
        self.from_shards = self.urls[0].endswith(".tar")
        self._count = sum(1 for _ in self._shard_images()) if self.from_shards else len(self.urls)

    def __len__(self) -> int:
        return self._count

    def check_sizes(self, tile_size: int) -> None:
        """Fail before any work if a real tile is unreadable or not tile_size x tile_size."""
        for where, (w, h) in self._sizes():
            if (w, h) != (tile_size, tile_size):
                raise InvalidInputError(f"real tile {where} is {w}x{h}, expected {tile_size}x{tile_size}")

    def _sizes(self) -> Iterator[tuple[str, tuple[int, int]]]:
        if self.from_shards:
            for i, image in enumerate(self._shard_images()):
                yield f"{i} of {self.url}", (image.shape[1], image.shape[0])
        else:
            for url in self.urls:
                yield url, storage.real_tile_size(url)

    def _shard_images(self) -> Iterator[np.ndarray]:
        return storage.iter_shard_images(self.urls)

    def __call__(self, indices: Sequence[int], seeds: Sequence[int]) -> list[np.ndarray]:
        if not self.from_shards:
            return [storage.read_real_tile(self.urls[i]) for i in indices]
        # Shards are streamed, not indexed: skip to the batch (real sets are thousands, not millions).
        return list(itertools.islice(self._shard_images(), indices[0], indices[0] + len(indices)))


@dataclass
class ShardWorker:
    """Loads the models once; `run(shard)` synthesizes and commits one shard."""

    config: GenerateConfig
    device: str = "cpu"
    batch_size: int = 4
    worker_id: str = "local"
    synthesizer: TileSynthesizer = field(init=False)
    bundle: ModelBundle = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.bundle = load_models(c).to(self.device)
        source = RealTileSource(c.real_tiles) if c.normal_source == "real" else c.normal_source
        plan = plan_from_json(c.plan) if c.plan else None
        self.synthesizer = build_synthesizer(self.bundle, c.settings, source, plan, self.device)

    def run(self, shard: int, layout: JobLayout, on_tiles: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Synthesize every tile of `shard` in batches, then commit the shard; returns its stats."""
        c = self.config
        writer = storage.ShardWriter(c.out, shard, c.image_format)
        seconds = 0.0
        for batch in _batched(layout.tiles(shard), self.batch_size):
            start = time.perf_counter()
            samples = self.synthesizer(batch, [tile_seed(c.seed, i) for i in batch])
            seconds += time.perf_counter() - start
            for s in samples:
                writer.add(s.tile_index, s.image, s.annotation)
            if on_tiles:
                on_tiles(len(batch))
        return writer.commit({"worker": self.worker_id, "synth_seconds": round(seconds, 3)})


def load_models(config: GenerateConfig) -> ModelBundle:
    """The bundle a config names: random weights for `tiny` (or when asked), else from disk/URL."""
    if config.model_dir:
        return load_bundle(config.model_dir, config.preset, config.lora, config.acs_unet, config.detector)
    if config.preset == "tiny" or config.random_weights:
        bundle = random_bundle(config.preset, seed=0)
        bundle.detector_path = config.detector
        if config.detector and os.path.isfile(config.detector):  # a missing file fails in load_detector
            bundle.fingerprints["detector"] = fingerprint(config.detector)
        return bundle
    raise InvalidInputError(
        f"preset {config.preset} needs --model-dir with real weights (or --random-weights for benchmarks)"
    )


def _batched(items: range, size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
