"""`ShardReplica`: the body of the Ray actor that holds one model replica.

Kept apart from the scheduler and from model code so that a replica process imports only what
its worker factory needs (a simulated replica never imports torch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from cytosynth.generation.generate_config import JobLayout
from cytosynth.generation.shard_maker import ShardMaker

# make_shard_maker(device=..., identity=...) -> ShardMaker, e.g. functools.partial(load_shard_maker, config).
ShardMakerFactory = Callable[..., ShardMaker]


class ShardReplica:
    """One ShardMaker per actor: models loaded once by `load`, then whole shards via `run`.

    The torch device is separate from what Ray reserved: `device=None` computes on the GPU Ray
    assigned (cuda) or on CPU when it assigned none; an explicit device (e.g. "cpu" on fake GPUs
    in tests) wins.
    """

    def __init__(self, make_shard_maker: ShardMakerFactory, device: str | None) -> None:
        context = ray.get_runtime_context()
        gpus = list(context.get_accelerator_ids().get("GPU", []))
        self.device = device or ("cuda" if gpus else "cpu")
        self.identity = {"replica": context.get_actor_id(), "node": context.get_node_id(), "gpus": gpus, "pid": os.getpid()}
        self._make_shard_maker = make_shard_maker
        self._maker: ShardMaker | None = None

    def load(self) -> dict[str, Any]:
        """Load the models; returns their fingerprints and where this replica runs."""
        if self._maker is None:
            self._maker = self._make_shard_maker(device=self.device, identity=self.identity)
        return {"fingerprints": self._maker.fingerprints, **self._maker.identity}

    def run(self, shard: int, layout: JobLayout, attempt: int) -> dict[str, Any]:
        """Make and commit one shard; its stats without the manifest rows (they stay in storage,
        so the driver never receives per-tile data)."""
        assert self._maker is not None, "load() first"
        stats = self._maker.run(shard, layout, attempt)
        stats.pop("samples", None)
        return stats
