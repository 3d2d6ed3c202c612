"""Seed derivation: every random choice for tile i comes from (job seed, i) alone.

Nothing here touches global RNG state, so results never depend on batch size, worker count or
which worker ran a tile.
"""

import zlib

import numpy as np

from .errors import InvalidInputError

_MASK63 = (1 << 63) - 1


def tile_seed(job_seed: int, tile_index: int) -> int:
    """Seed of tile ``tile_index`` in a job seeded with ``job_seed``.

    A non-negative 63-bit int, so it fits ``torch.Generator.manual_seed`` and int64 columns.
    """
    if job_seed < 0 or tile_index < 0:
        raise InvalidInputError(f"seeds and tile indices must be non-negative, got seed {job_seed}, tile {tile_index}")
    lo, hi = np.random.SeedSequence([job_seed, tile_index]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & _MASK63


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """Independent numpy stream for one ``purpose`` ("phantom", "selection", ...) of a tile.

    The purpose is hashed (crc32, stable across processes unlike ``hash``) into the seed
    sequence, so adding a new purpose never shifts the draws of an existing one.
    """
    if seed < 0:
        raise InvalidInputError(f"seeds must be non-negative, got {seed}")
    tag = zlib.crc32(purpose.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))
