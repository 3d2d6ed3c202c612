"""A rank of a real torch.distributed (gloo) process group, run by torch.multiprocessing.spawn in
the loader tests. Its own small module: a spawned process imports it, not the test module."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cytosynth.storage import ShardDetectionDataset, collate_detection


def epoch_ids(dataset: ShardDetectionDataset, workers: int) -> list[int]:
    """Tile indices of one epoch of ``dataset`` through ``workers`` DataLoader worker processes."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate_detection)
    return [int(t["image_id"]) for _, targets in loader for t in targets]


def gloo_rank(rank: int, world_size: int, output: str, init_file: str, results: str) -> None:
    """Join the group, read one epoch of ``output`` with 2 workers, write the ids to results/<rank>.json."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ids = epoch_ids(ShardDetectionDataset(output, seed=3), workers=2)
        Path(results, f"{rank}.json").write_text(json.dumps(ids))
    finally:
        torch.distributed.destroy_process_group()
