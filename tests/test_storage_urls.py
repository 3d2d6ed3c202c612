"""URL helpers: joining, filesystems for each scheme, the S3 endpoint, and shard URL patterns."""

from __future__ import annotations

import fsspec.config
import pytest

from cytosynth.storage import ShardWriter, filesystem, join, shard_url, shard_urls
from cytosynth.storage.urls import READ_CONCURRENCY


@pytest.mark.parametrize("parts, expected", [
    (("s3://b/out", "shards", "000001.tar"), "s3://b/out/shards/000001.tar"),
    (("s3://b/out/", "/shards/"), "s3://b/out/shards"),
    (("memory://", "x"), "memory://x"),
    (("/tmp/out", "a/b", ""), "/tmp/out/a/b"),
    (("out",), "out"),
])
def test_join(parts, expected):
    assert join(*parts) == expected


def test_s3_endpoint_comes_from_the_environment_unless_given(s3_bucket, s3_server, monkeypatch):
    fs, path = filesystem(s3_bucket + "/x")
    assert path == s3_bucket.removeprefix("s3://") + "/x"
    assert fs.client_kwargs["endpoint_url"] == s3_server
    fs.pipe_file(path, b"hello")  # reaches the moto server

    explicit = "http://127.0.0.1:9"
    fs, _ = filesystem(s3_bucket, client_kwargs={"endpoint_url": explicit})
    assert fs.client_kwargs["endpoint_url"] == explicit

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    fs, _ = filesystem(s3_bucket)
    assert "endpoint_url" not in (fs.client_kwargs or {})


def test_fsspecs_own_s3_configuration_is_extended_by_the_endpoint_and_pool_size_not_replaced(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"region_name": "eu-west-3"},
                                                   "config_kwargs": {"connect_timeout": 7}})
    fs, _ = filesystem(s3_bucket)
    assert fs.client_kwargs == {"region_name": "eu-west-3", "endpoint_url": s3_server}
    assert fs.config_kwargs == {"connect_timeout": 7, "max_pool_connections": READ_CONCURRENCY}


def test_shard_urls_accepts_folder_single_tar_brace_and_glob(tmp_path, make_tile):
    out = str(tmp_path)
    for shard in (0, 1, 2):
        writer = ShardWriter(out, shard)
        writer.add(shard, *make_tile(shard))
        writer.commit()
    every = [shard_url(out, i) for i in (0, 1, 2)]
    assert shard_urls(out) == every
    assert shard_urls(every[1]) == [every[1]]
    assert shard_urls(out + "/shards/{000000..000001}.tar") == every[:2]
    assert [u.removeprefix("file://") for u in shard_urls(out + "/shards/00000[12].tar")] == every[1:]
