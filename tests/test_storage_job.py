"""Job markers: job.json is written first and guards the output against a different job; _SUCCESS is
written last; credentials never reach any file (docs/design.md §4, invariant 7)."""

from __future__ import annotations

import fsspec.config
import pytest

from cytosynth.storage import (
    ShardWriter,
    StorageError,
    filesystem,
    is_complete,
    read_job_json,
    write_coco,
    write_job_json,
    write_manifest,
    write_preview,
    write_success,
)

CONFIG = {"tiles": 6, "tiles_per_shard": 3, "seed": 7, "preset": "tiny", "out": "s3://bucket/run"}
FAKE_SECRET = "FAKE-secret-0123456789-must-not-be-stored"


def test_job_json_records_config_versions_and_extra(storage_root):
    assert read_job_json(storage_root) is None
    record = write_job_json(storage_root, CONFIG, extra={"models": {"unet": "sha256:abc"}})
    assert read_job_json(storage_root) == record
    assert record["config"] == CONFIG
    assert record["models"] == {"unet": "sha256:abc"}
    assert record["versions"]["cytosynth"] == "0.1.0" and "python" in record["versions"]


def test_same_config_resumes_and_a_different_one_is_refused(tmp_path):
    out = str(tmp_path / "out")
    first = write_job_json(out, CONFIG)
    assert write_job_json(out, dict(CONFIG)) == first  # a resume keeps the original record
    with pytest.raises(StorageError) as failure:
        write_job_json(out, {**CONFIG, "seed": 8, "tiles": 9})
    message = str(failure.value)
    assert "was written by a different job config; use a new --out" in message
    assert "(differs in: seed, tiles)" in message and "\n" not in message
    assert read_job_json(out) == first


def test_credentials_never_reach_the_output(s3_bucket, make_tile, monkeypatch):
    out = s3_bucket + "/run"
    secrets = {"key": "testing", "secret": FAKE_SECRET}
    monkeypatch.setitem(fsspec.config.conf, "s3", secrets)  # how a user gives s3fs credentials
    config = {**CONFIG, "storage_options": {**secrets, "client_kwargs": {"region_name": "us-east-1"}},
              "weights": f"https://user:{FAKE_SECRET}@example.invalid/w.safetensors"}
    record = write_job_json(out, config)
    assert record["config"]["storage_options"] == {
        "key": "<redacted>", "secret": "<redacted>", "client_kwargs": {"region_name": "us-east-1"}}
    assert record["config"]["weights"] == "https://***@example.invalid/w.safetensors"

    writer = ShardWriter(out, 0)
    writer.add(0, *make_tile(0))
    writer.commit({"replica": "w0"})
    for write in (write_manifest, write_coco, write_preview):
        write(out)
    write_success(out, {"tiles": 1, "storage_options": secrets}, expected_shards=1)

    fs, path = filesystem(out)
    assert fs.storage_options["secret"] == FAKE_SECRET  # the secret was in use
    files = fs.find(path)
    assert len(files) == 7  # job.json, _SUCCESS, manifest, coco, preview, shard tar + json
    for name in files:
        assert FAKE_SECRET.encode() not in fs.cat_file(name), name


def test_success_is_written_last_and_only_when_all_shards_are_committed(storage_root, make_tile):
    write_job_json(storage_root, CONFIG)
    writer = ShardWriter(storage_root, 0)
    writer.add(0, *make_tile(0))
    writer.commit()
    with pytest.raises(StorageError, match=r"1 of 2 shards are not committed \(first: 1\)"):
        write_success(storage_root, {"tiles": 6}, expected_shards=2)
    assert not is_complete(storage_root)
    writer = ShardWriter(storage_root, 1)
    writer.add(3, *make_tile(3))
    writer.commit()
    write_success(storage_root, {"tiles": 6}, expected_shards=2)
    assert is_complete(storage_root)
