"""Finalize at scale (issue 15, item 2): shard stats read concurrently in shard order, the manifest
streamed into its object (multipart on S3) with the same bytes as when it was built in one
buffer, and `_SUCCESS` still last, only when every shard is committed."""

from __future__ import annotations

import io
import json
import os
import threading

import pyarrow.parquet as pq
import pytest

from cytosynth import storage
from cytosynth.generation.generate_config import GenerateConfig, JobLayout
from cytosynth.generation.runner import finalize_job
from cytosynth.storage import ShardWriter, StorageError, filesystem, is_complete, join, stats_url, write_job_json
from cytosynth.storage import manifest as manifest_module
from cytosynth.storage import objects
from cytosynth.storage.manifest import MANIFEST_NAME, MANIFEST_SCHEMA, manifest_table
from cytosynth.storage.objects import map_ordered, open_whole
from cytosynth.storage.urls import READ_CONCURRENCY

TILES_PER_SHARD = 3


def commit_shards(out: str, make_tile, shards: range, tiles_per_shard: int = TILES_PER_SHARD) -> None:
    write_job_json(out, {"tiles_per_shard": tiles_per_shard})
    for shard in shards:
        writer = ShardWriter(out, shard)
        for tile in reversed(range(shard * tiles_per_shard, (shard + 1) * tiles_per_shard)):
            # Tiles added out of order: the manifest must still be in tile order.
            writer.add(tile, *make_tile(tile, labels=["HSIL"] if tile % 2 else None))
        writer.commit({"replica": f"w{shard % 2}"})


def buffered_manifest(out: str) -> bytes:
    """The manifest as it was written before it was streamed: the same rows and row groups,
    built in one buffer (the reference the streamed file must equal byte for byte)."""
    rows = list(storage.manifest_rows(out))
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, MANIFEST_SCHEMA) as writer:
        for start in range(0, len(rows), manifest_module.ROW_GROUP_ROWS):
            writer.write_table(manifest_table(rows[start : start + manifest_module.ROW_GROUP_ROWS]))
    return buf.getvalue()


def read_object(url: str) -> bytes:
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs.cat_file(path)


def object_exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs.exists(path)


def test_finalize_writes_the_same_manifest_bytes_as_the_buffered_writer_and_success_last(
    storage_root, make_tile, monkeypatch
):
    monkeypatch.setattr(manifest_module, "ROW_GROUP_ROWS", 4)  # several row groups, split mid-shard
    commit_shards(storage_root, make_tile, range(4))
    layout = JobLayout(4 * TILES_PER_SHARD, TILES_PER_SHARD)
    summary = finalize_job(GenerateConfig(out=storage_root, tiles_per_shard=TILES_PER_SHARD), layout, 1.0)

    manifest = read_object(join(storage_root, MANIFEST_NAME))
    assert manifest == buffered_manifest(storage_root)
    table = pq.read_table(io.BytesIO(manifest))
    assert table.num_rows == 12 and pq.ParquetFile(io.BytesIO(manifest)).num_row_groups == 3
    assert table.column("tile_index").to_pylist() == list(range(12))
    markers = [json.loads(read_object(stats_url(storage_root, s))) for s in range(4)]
    assert table.to_pylist() == [row for m in markers for row in sorted(m["samples"], key=lambda r: r["tile_index"])]
    assert is_complete(storage_root)
    assert summary["tiles"] == 12 and summary["shards"] == 4 and summary["cells"]["HSIL"] == 6


def test_finalize_writes_no_success_while_a_shard_marker_is_missing(storage_root, make_tile):
    commit_shards(storage_root, make_tile, range(3))
    fs, path = filesystem(stats_url(storage_root, 1))
    fs.rm_file(path)
    layout = JobLayout(3 * TILES_PER_SHARD, TILES_PER_SHARD)
    with pytest.raises(StorageError, match=r"1 of 3 shards are not committed \(first: 1\)"):
        finalize_job(GenerateConfig(out=storage_root, tiles_per_shard=TILES_PER_SHARD), layout, 1.0)
    assert not is_complete(storage_root)


def test_a_damaged_marker_leaves_neither_a_manifest_nor_success(storage_root, make_tile, monkeypatch):
    monkeypatch.setattr(manifest_module, "ROW_GROUP_ROWS", 2)  # rows of shard 0 are written before shard 2 fails
    commit_shards(storage_root, make_tile, range(4))
    fs, path = filesystem(stats_url(storage_root, 2))
    fs.pipe_file(path, b"{not json")
    layout = JobLayout(4 * TILES_PER_SHARD, TILES_PER_SHARD)
    with pytest.raises(StorageError, match=r"000002\.json.*cytosynth verify --repair") as failure:
        finalize_job(GenerateConfig(out=storage_root, tiles_per_shard=TILES_PER_SHARD), layout, 1.0)
    assert "\n" not in str(failure.value)
    assert not object_exists(join(storage_root, MANIFEST_NAME))
    assert not is_complete(storage_root)


def test_a_large_object_is_streamed_to_s3_as_a_multipart_upload(s3_bucket, monkeypatch):
    monkeypatch.setattr(objects, "STREAM_PART_BYTES", 5 * 2**20)  # S3's smallest part
    url = s3_bucket + "/big.bin"
    chunk = os.urandom(2**20)
    with open_whole(url) as f:
        for _ in range(11):
            f.write(chunk)
        assert not object_exists(url)  # two parts are uploaded, yet nothing is visible
    assert read_object(url) == chunk * 11
    fs, path = filesystem(url)
    assert fs.info(path)["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload


def test_a_stream_that_fails_leaves_no_object(storage_root, monkeypatch):
    monkeypatch.setattr(objects, "STREAM_PART_BYTES", 5 * 2**20)
    url = join(storage_root, "big.bin")
    with pytest.raises(RuntimeError, match="writer failed"):
        with open_whole(url) as f:
            f.write(os.urandom(6 * 2**20))  # one part already uploaded on S3
            raise RuntimeError("writer failed")
    assert not object_exists(url)
    fs, path = filesystem(storage_root)
    fs.invalidate_cache()
    assert not fs.exists(path) or fs.ls(path) == []  # no temp file left behind either


def test_map_ordered_runs_calls_at_once_and_keeps_item_order():
    concurrency = 4
    meet = threading.Barrier(concurrency, timeout=30)  # passes only if 4 calls are running together

    def read(item: int) -> int:
        meet.wait()
        return item * 10

    assert list(map_ordered(read, range(16), concurrency=concurrency)) == [i * 10 for i in range(16)]


def test_map_ordered_bounds_the_calls_ahead_of_the_consumer_and_raises_the_first_error_in_order():
    started: list[int] = []

    def read(item: int) -> int:
        started.append(item)
        if item in (5, 7):
            raise ValueError(f"bad item {item}")
        return item

    results = map_ordered(read, range(10_000), concurrency=3)
    assert next(results) == 0
    results.close()  # the consumer stops: nothing more may start
    assert len(started) <= 2 * 3 + 1
    yielded = []
    with pytest.raises(ValueError, match="bad item 5"):
        for result in map_ordered(read, range(10), concurrency=3):
            yielded.append(result)
    assert yielded == [0, 1, 2, 3, 4]  # item 7 failed too, but 5 comes first


def test_an_s3_client_pools_a_connection_for_every_read_in_flight(s3_bucket):
    fs, _ = filesystem(s3_bucket + "/out")
    fs.connect()
    assert fs.s3.meta.config.max_pool_connections == READ_CONCURRENCY  # botocore's default, 10, would queue reads
    chosen, _ = filesystem(s3_bucket + "/out", config_kwargs={"max_pool_connections": 4})
    chosen.connect()
    assert chosen.s3.meta.config.max_pool_connections == 4  # a caller's own choice wins
