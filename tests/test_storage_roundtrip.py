"""Round trip of the data contract (docs/design.md §3) on every backend: what ShardWriter commits,
read_samples, plain tarfile, webdataset and the manifest all read back identically."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from cytosynth.storage import (
    ShardWriter,
    committed_shards,
    decode_image,
    encode_image,
    filesystem,
    open_shards,
    read_manifest,
    read_samples,
    shard_url,
    shard_urls,
    write_manifest,
)

TILES_PER_SHARD = 3


@pytest.fixture
def dataset(storage_root, make_tile):
    """Two committed shards (tiles 0-2 and 3-5) under ``storage_root``; returns (url, tiles)."""
    tiles = {i: make_tile(i, boxes=[[1, 2, 10 + i, 12 + i]] * (i % 3), labels=["LSIL", "HSIL"][: i % 3])
             for i in range(2 * TILES_PER_SHARD)}
    for shard in range(2):
        writer = ShardWriter(storage_root, shard)
        for i in range(shard * TILES_PER_SHARD, (shard + 1) * TILES_PER_SHARD):
            writer.add(i, *tiles[i])
        writer.commit()
    return storage_root, tiles


def test_committed_shards_are_listed(dataset):
    url, _ = dataset
    assert committed_shards(url) == {0, 1}
    assert shard_urls(url) == [shard_url(url, 0), shard_url(url, 1)]


def test_read_samples_returns_exact_pixels_and_annotations(dataset):
    url, tiles = dataset
    samples = list(read_samples(url))
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(6)]
    for sample in samples:
        image, annotation = tiles[sample["tile_index"]]
        np.testing.assert_array_equal(sample["image"], image)  # PNG is lossless
        assert sample["json"]["boxes"] == annotation["boxes"]
        assert sample["json"]["labels"] == annotation["labels"]
        assert sample["json"]["seed"] == annotation["seed"]
        assert sample["json"]["category_ids"] == [{"LSIL": 3, "HSIL": 4}[x] for x in annotation["labels"]]


def test_plain_tarfile_sees_one_json_and_one_png_per_sample(dataset):
    url, tiles = dataset
    fs, path = filesystem(shard_url(url, 1))
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{i:09d}.{ext}" for i in (3, 4, 5) for ext in ("json", "png")]
        assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
        png = tar.extractfile("000000004.png").read()
        ann = json.loads(tar.extractfile("000000004.json").read())
    assert png == encode_image(tiles[4][0], "png")  # bit-exact bytes, not just pixels
    assert ann["tile_index"] == 4


def _wds_samples(url):
    urls = shard_urls(url)
    if url.startswith(("memory://", "s3://")):
        # webdataset opens local files itself; for object stores it reads through our fsspec stage.
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), open_shards, tar_file_expander, group_by_keys)
    else:
        pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(pipeline)


def test_webdataset_reads_the_same_samples(dataset):
    url, tiles = dataset
    samples = _wds_samples(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    for sample in samples:
        image, annotation = tiles[int(sample["__key__"])]
        np.testing.assert_array_equal(decode_image(sample["png"]), image)
        assert json.loads(sample["json"])["boxes"] == annotation["boxes"]


def test_manifest_has_one_row_per_sample_matching_the_shards(dataset):
    url, _ = dataset
    write_manifest(url)
    rows = read_manifest(url).to_pylist()
    samples = list(read_samples(url))
    assert len(rows) == len(samples) == 6
    for row, sample in zip(rows, samples):
        ann = sample["json"]
        assert row["key"] == sample["key"]
        assert row["tile_index"] == sample["tile_index"]
        assert row["shard"] == sample["tile_index"] // TILES_PER_SHARD
        assert (row["seed"], row["boxes"], row["labels"], row["source"]) == (
            ann["seed"], ann["boxes"], ann["labels"], ann["source"])
        assert (row["width"], row["height"]) == sample["image"].shape[1::-1]


def test_a_box_must_lie_in_the_painted_box_its_cell_was_painted_in():
    from cytosynth.storage.annotations import normalize_annotation

    ann = {"boxes": [[10, 12, 30, 40]], "labels": ["HSIL"], "painted_boxes": [[5, 5, 60, 60]]}
    assert normalize_annotation(ann, 0, 64, 64)["painted_boxes"] == [[5, 5, 60, 60]]
    for painted in ([[12, 5, 60, 60]], [[5, 5, 60, 60], [0, 0, 8, 8]]):
        with pytest.raises(ValueError, match="do not lie each in its painted box"):
            normalize_annotation({**ann, "painted_boxes": painted}, 0, 64, 64)
