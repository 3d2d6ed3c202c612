"""A small complete cytosynth output written by ShardWriter (job.json, committed shards,
manifest.parquet, _SUCCESS) for the reader tests: 2 shards of 2 smooth 64x64 tiles."""

from __future__ import annotations

import numpy as np

from cytosynth.storage import ShardWriter, write_job_json, write_manifest, write_success

SIZE, SHARDS, PER_SHARD = 64, 2, 2
TILES = range(SHARDS * PER_SHARD)
# Tile i: cells of these classes (tile 2 has none) and one NILM box each.
CELLS = {0: ["HSIL"], 1: ["ASC-US", "LSIL"], 2: [], 3: ["ASC-H"]}


def tile(i: int) -> tuple[np.ndarray, dict]:
    """A smooth 64x64 tile (lossy codecs stay close to it) and its annotation."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([x * 3 + 5 * i, y * 3 + 9 * i, np.full_like(x, 40 * i)], axis=2).astype(np.uint8)
    labels = CELLS[i]
    return image, {
        "seed": 100 + i,
        "boxes": [[2 + 12 * k, 3, 10 + 12 * k, 14 + i] for k in range(len(labels))],
        "labels": labels,
        "normal_boxes": [[40, 40, 52, 50 + i]],
        "source": "synthetic",
    }


def write_output(out: str, image_format: str = "png", *, shards: int = SHARDS, per_shard: int = PER_SHARD) -> str:
    """A complete output: job.json, committed shards (tiles 0, 1, ... in order), manifest.parquet, _SUCCESS."""
    write_job_json(out, {"test": "readers", "image_format": image_format})
    for shard in range(shards):
        writer = ShardWriter(out, shard, image_format)
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            writer.add(i, *tile(i))
        writer.commit()
    write_manifest(out)
    write_success(out, {"shards": shards, "tiles": shards * per_shard}, expected_shards=shards)
    return out
