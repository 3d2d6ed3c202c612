"""The detector loader (storage.loader): exactly once per epoch across DataLoader workers x ranks,
a new order each epoch, the real/synthetic ratio, targets equal to the shard JSON, s3://."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cytosynth.storage import (
    ShardDetectionDataset,
    ShardWriter,
    StorageError,
    detection_loader,
    put_bytes,
    read_samples,
    shard_url,
    split_shards,
    stats_url,
)

REAL_SHARDS, REAL_PER_SHARD = 5, 3  # 5 shards over 4 readers: one shard is split by sample
SYNTHETIC_SHARDS, SYNTHETIC_PER_SHARD, SYNTHETIC_FIRST = 3, 4, 100  # fewer shards than readers
RANKS, WORKERS = 2, 2
CLASSES = ("ASC-US", "ASC-H", "LSIL", "HSIL")


def write_shards(out: str, shards: int, per_shard: int, first: int = 0) -> None:
    """Committed shards of 32x32 tiles ``first, first+1, ...`` with 0-2 abnormal and 1 normal box."""
    tile = first
    for shard in range(shards):
        writer = ShardWriter(out, shard)
        for _ in range(per_shard):
            rng = np.random.default_rng(tile)
            cells = tile % 3
            writer.add(tile, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), {
                "boxes": [[1 + 8 * k, 2, 7 + 8 * k + tile % 5, 12] for k in range(cells)],
                "labels": [CLASSES[(tile + k) % 4] for k in range(cells)],
                "normal_boxes": [[20, 18, 30, 31]],
                "source": "synthetic",
            })
            tile += 1
        writer.commit()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("loader")
    real, synthetic = str(root / "real"), str(root / "synthetic")
    write_shards(real, REAL_SHARDS, REAL_PER_SHARD)
    write_shards(synthetic, SYNTHETIC_SHARDS, SYNTHETIC_PER_SHARD, SYNTHETIC_FIRST)
    return real, synthetic


REAL_IDS = set(range(REAL_SHARDS * REAL_PER_SHARD))
SYNTHETIC_IDS = set(range(SYNTHETIC_FIRST, SYNTHETIC_FIRST + SYNTHETIC_SHARDS * SYNTHETIC_PER_SHARD))


def epoch_ids(real, synthetic=None, *, epoch=0, ranks=RANKS, workers=WORKERS, **options) -> list[list[int]]:
    """Tile indices each rank sees in one epoch, through real DataLoader worker processes."""
    per_rank = []
    for rank in range(ranks):
        loader = detection_loader(real, synthetic, batch_size=2, num_workers=workers, rank=rank,
                                  world_size=ranks, **options)
        loader.dataset.set_epoch(epoch)
        per_rank.append([int(t["image_id"]) for _, targets in loader for t in targets])
    return per_rank


@pytest.mark.parametrize("epoch", [0, 1])
def test_every_real_sample_exactly_once_per_epoch_across_workers_and_ranks(sources, epoch):
    per_rank = epoch_ids(sources[0], epoch=epoch)
    seen = Counter(i for ids in per_rank for i in ids)
    assert set(seen) == REAL_IDS and set(seen.values()) == {1}
    # 15 samples over 4 readers of equal 3-tile shards: readers get 4, 4, 4, 3 -> ranks 8 and 7.
    assert sorted(map(len, per_rank)) == [7, 8]


def test_fewer_shards_than_readers_still_yields_each_sample_once(sources):
    # synthetic_fraction=1: the synthetic set (3 shards, 4 readers) is the epoch.
    per_rank = epoch_ids(None, sources[1], synthetic_fraction=1.0)
    seen = Counter(i for ids in per_rank for i in ids)
    assert set(seen) == SYNTHETIC_IDS and set(seen.values()) == {1}
    assert all(per_rank)


def test_split_shards_covers_every_shard_once_whole_or_shared():
    shards = [f"s{i}" for i in range(7)]
    parts = [split_shards(shards, slot, 4) for slot in range(4)]
    assert sorted(s for whole, _ in parts for s in whole) == shards[:4]
    assert all(shared == shards[4:] for _, shared in parts)


def test_order_changes_between_epochs_and_is_reproducible(sources):
    dataset = ShardDetectionDataset(sources[0], seed=7)

    def order(epoch):
        dataset.set_epoch(epoch)
        return [int(t["image_id"]) for _, t in dataset]

    first, second = order(0), order(1)
    assert sorted(first) == sorted(second) == sorted(REAL_IDS)
    assert first != second
    assert order(1) == second  # same (seed, epoch): same order
    unshuffled = ShardDetectionDataset(sources[0], shuffle=False)
    assert [int(t["image_id"]) for _, t in unshuffled] == sorted(REAL_IDS)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_mixing_ratio_holds_and_real_stays_exactly_once(sources, fraction):
    ids = [i for rank in epoch_ids(*sources, synthetic_fraction=fraction, epoch=3) for i in rank]
    real = Counter(i for i in ids if i in REAL_IDS)
    synthetic = [i for i in ids if i not in REAL_IDS]
    assert set(real) == REAL_IDS and set(real.values()) == {1}
    assert set(synthetic) <= SYNTHETIC_IDS
    # Stated tolerance: half a sample per reader (ranks x workers) around f / (1 - f) per real sample.
    expected = len(real) * fraction / (1 - fraction)
    assert abs(len(synthetic) - expected) <= 0.5 * RANKS * WORKERS
    if expected > len(SYNTHETIC_IDS):  # 0.8 needs 60 draws from 12: the synthetic set cycles
        assert set(synthetic) == SYNTHETIC_IDS


def test_zero_fraction_reads_real_only(sources):
    ids = [i for rank in epoch_ids(*sources, synthetic_fraction=0.0) for i in rank]
    assert sorted(ids) == sorted(REAL_IDS)


@pytest.mark.parametrize("labels", ["abnormal", "nilm"])
def test_targets_and_images_equal_the_shard_contents(sources, labels):
    expected = {s["tile_index"]: s for s in read_samples(sources[0])}
    dataset = ShardDetectionDataset(sources[0], labels=labels)
    items = list(dataset)
    assert len(items) == len(expected)
    for image, target in items:
        sample = expected[int(target["image_id"])]
        ann = sample["json"]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        torch.testing.assert_close(image, torch.from_numpy(sample["image"]).permute(2, 0, 1) / 255.0)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        if labels == "abnormal":
            assert target["boxes"].tolist() == ann["boxes"]
            assert target["labels"].tolist() == ann["category_ids"]
        else:  # every cell, edited ones included, is class 1
            assert target["boxes"].tolist() == ann["normal_boxes"] + ann["boxes"]
            assert target["labels"].tolist() == [1] * (len(ann["normal_boxes"]) + len(ann["boxes"]))
    assert any(len(t["boxes"]) == 0 for _, t in items) == (labels == "abnormal")  # tiles without cells


def test_batches_train_a_torchvision_faster_rcnn(sources):
    from cytosynth.synth.detector import build_fasterrcnn

    torch.manual_seed(0)
    model = build_fasterrcnn(5, min_size=32, max_size=32).train()
    images, targets = next(iter(detection_loader(sources[0], batch_size=3, num_workers=0)))
    assert len(images) == len(targets) == 3
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_reads_s3_shards_in_worker_processes(s3_bucket):
    real = s3_bucket + "/real"
    write_shards(real, 3, 2)
    (ids,) = epoch_ids(real, ranks=1, workers=2)
    assert sorted(ids) == list(range(6))


@pytest.mark.parametrize("options, message", [
    ({"synthetic_fraction": -0.1}, "synthetic_fraction must be in"),
    ({"synthetic_fraction": 1.5}, "synthetic_fraction must be in"),
    ({"synthetic_fraction": float("nan")}, "synthetic_fraction must be in"),
    ({"labels": "cells"}, "unknown label set"),
    ({"rank": 2, "world_size": 2}, "rank < world_size"),
])
def test_bad_arguments_are_refused(sources, options, message):
    with pytest.raises(ValueError, match=message):
        ShardDetectionDataset(sources[0], sources[1], **options)


def test_a_fraction_without_synthetic_shards_is_refused(sources):
    with pytest.raises(ValueError, match="needs synthetic shards"):
        ShardDetectionDataset(sources[0], synthetic_fraction=0.5)


def test_missing_and_unreadable_shards_are_one_line_storage_errors(tmp_path, sources):
    with pytest.raises(StorageError, match="no committed shards"):
        ShardDetectionDataset(str(tmp_path / "nothing"))
    broken = str(tmp_path / "broken")
    put_bytes(shard_url(broken, 0), b"this is not a tar archive" * 40)
    put_bytes(stats_url(broken, 0), b"{}")
    with pytest.raises(StorageError) as err:
        list(ShardDetectionDataset(broken))
    assert "000000.tar" in str(err.value) and "\n" not in str(err.value)


def _ids_on_a_gloo_rank(rank: int, world_size: int, store: str, real: str, out: str) -> None:
    """One torch.distributed process: the loader takes its rank and world size from the group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        loader = detection_loader(real, batch_size=2, num_workers=0)
        loader.dataset.set_epoch(0)
        ids = [int(t["image_id"]) for _, targets in loader for t in targets]
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(" ".join(map(str, ids)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: 10-50 s
def test_rank_and_world_size_default_to_the_torch_distributed_group(sources, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ids")
    mp.spawn(_ids_on_a_gloo_rank, args=(2, str(tmp_path / "store"), sources[0], out), nprocs=2)
    from_group = [[int(i) for i in open(f"{out}.{rank}").read().split()] for rank in range(2)]
    assert from_group == epoch_ids(sources[0], ranks=2, workers=0)  # as if rank / world_size were given
    assert all(from_group) and sorted(i for ids in from_group for i in ids) == sorted(REAL_IDS)


def test_a_shard_sets_size_comes_from_its_markers_and_a_bare_tars_is_unknown(sources, tmp_path):
    from cytosynth.training.detector_task import count_boxes
    from cytosynth.storage import count_samples, resolve_shards

    real = resolve_shards(sources[0])
    assert count_samples(real) == REAL_SHARDS * REAL_PER_SHARD
    abnormal = sum(t % 3 for t in REAL_IDS)
    assert count_boxes(real, "abnormal") == abnormal
    assert count_boxes(real, "nilm") == abnormal + len(REAL_IDS)  # one normal box per tile
    bare = tmp_path / "other-tool.tar"  # a tar named outside a cytosynth output: no marker
    bare.write_bytes(open(real[0], "rb").read())
    assert count_samples([*real, str(bare)]) is None
    assert count_boxes([str(bare)], "abnormal") is None
