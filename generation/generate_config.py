"""What a generation job is: its config (the dataset's identity) and its shard layout.

Plain data with no model imports, so the driver's scheduler and light replicas (benchmarks)
can use it without pulling in torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from cytosynth.synth.settings import SynthesisSettings

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
    seed: int = 0
    tiles_per_shard: int = 64
    plan: str | None = None  # the plan's JSON text (a file is read by the CLI)
    image_format: str = "png"
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings)

    def record(self) -> dict[str, Any]:
        """The job.json form: the plan by hash (it can be large), no output URL (it is the key),
        the synthesis settings beside the other fields."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("out", "synthesis")}
        data.update(self.synthesis.record())
        if self.plan is not None:
            data["plan"] = "sha256:" + hashlib.sha256(self.plan.encode()).hexdigest()[:16]
        return data

    @classmethod
    def from_record(cls, out: str, record: Mapping[str, Any], plan: str | None = None) -> GenerateConfig:
        """The config whose `record()` is `record`, but for the plan (job.json holds its hash only).
        Unknown keys are left out: the caller compares the records' hashes."""
        def known(of: type) -> dict[str, Any]:
            return {f.name: record[f.name] for f in fields(of) if f.name in record}

        own = {k: v for k, v in known(cls).items() if k not in ("out", "plan", "synthesis")}
        settings = known(SynthesisSettings)
        if "cells" in settings:
            settings["cells"] = tuple(settings["cells"])
        return cls(out=out, plan=plan, synthesis=SynthesisSettings(**settings), **own)


@dataclass(frozen=True)
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


def job_config(config: GenerateConfig, layout: JobLayout, fingerprints: dict[str, str]) -> dict[str, Any]:
    """The config job.json records (the dataset's identity); its `storage.config_sha256` is what
    every shard marker of the job carries. One place, for the driver and every replica."""
    return {**config.record(), "num_tiles": layout.num_tiles, "models": fingerprints}


@dataclass(frozen=True)
class PendingShards:
    """The shards a run still has to make, produced lazily: a million-tile job holds the set of
    committed shard indices, never a list of tiles. `committed` holds indices < layout.num_shards."""

    layout: JobLayout
    committed: frozenset[int]

    def __iter__(self) -> Iterator[int]:
        return (s for s in range(self.layout.num_shards) if s not in self.committed)

    def __len__(self) -> int:
        return self.layout.num_shards - len(self.committed)

    @property
    def done_tiles(self) -> int:
        """Tiles already in committed shards (the progress bar's starting point)."""
        return sum(len(self.layout.tiles(s)) for s in self.committed)
