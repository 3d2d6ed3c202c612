"""Real normal tiles for real-to-synthetic generation, read through the job's index of them.

The driver indexes the set once (`real_tile_index`, `storage.index_image_set`: headers or markers),
checks every tile's header size before anything is written, and `runner.prepare_job` stores the
index in the output; a `RealTileSource` (on every replica) reads that index, never the set's
listing, and reads tile i by one ranged read. Pixels a header cannot vouch for (a cut or corrupt
tile) are checked when read: the tile's shard fails with one line and is not committed.
Imports no torch: a Ray driver checks real tiles without loading model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cytosynth import storage
from cytosynth.synth import InvalidInputError

from .generate_config import GenerateConfig


def real_tile_index(config: GenerateConfig) -> storage.ImageIndex:
    """The index of the job's real tiles: the one in its output when it was made of this set (a
    resume reads the tiles the job started with, without listing the set again), else made now."""
    assert config.real_tiles
    url = storage.real_index_url(config.out)
    if storage.exists(url):
        index = storage.read_image_index(url)
        if index.source == config.real_tiles:
            return index
    return storage.index_image_set(config.real_tiles)


def tile_name(index: storage.ImageIndex, i: int) -> str:
    """How an error names real tile i: its file, or its position in a shard set."""
    return f"{i} of {index.source}" if index.from_shards else index.entry(i).url


def wrong_size(index: storage.ImageIndex, i: int, width: int, height: int, tile_size: int) -> InvalidInputError:
    return InvalidInputError(f"real tile {tile_name(index, i)} is {width}x{height}, expected {tile_size}x{tile_size}")


def check_header_sizes(index: storage.ImageIndex, tile_size: int) -> None:
    """Every real tile's header size is tile_size x tile_size (known from the index, no reads)."""
    i = index.first_not_of_size(tile_size, tile_size)
    if i is not None:
        entry = index.entry(i)
        raise wrong_size(index, i, entry.width, entry.height, tile_size)


def sample_positions(num_tiles: int, count: int) -> list[int]:
    """`count` tile indices spread evenly over [0, num_tiles), first and last included."""
    if count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, num_tiles - 1, min(count, num_tiles)).round()})


class RealTileSource:
    """A synth normal-tile source over an indexed real set: tile i is entry i of the index.

    `index` given (the driver's own) or read from `index_url` on first use, so that building a
    worker reads nothing and a replica reads the job's index once."""

    def __init__(self, index_url: str, tile_size: int, index: storage.ImageIndex | None = None) -> None:
        self.index_url, self.tile_size = index_url, tile_size
        self._index = index

    @property
    def index(self) -> storage.ImageIndex:
        if self._index is None:
            self._index = storage.read_image_index(self.index_url)
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> np.ndarray:
        """Tile i, decoded whole and checked against the tile size (a header can lie)."""
        image = storage.read_indexed_image(self.index, i)
        height, width = image.shape[:2]
        if (width, height) != (self.tile_size, self.tile_size):
            raise wrong_size(self.index, i, width, height, self.tile_size)
        return image

    def __call__(self, indices: Sequence[int], seeds: Sequence[int]) -> list[np.ndarray]:
        return [self.read(i) for i in indices]
