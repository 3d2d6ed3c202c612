"""The commit protocol (docs/design.md §4, invariant 3): a shard is visible whole once committed, and nothing
of it is visible before; shard bytes do not depend on the order tiles were added in."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from cytosynth.storage import (
    ShardWriter,
    StorageError,
    committed_shards,
    encode_image,
    filesystem,
    get_bytes,
    list_names,
    read_samples,
    put_bytes,
    read_shard_stats,
    remove_temp_files,
    shard_url,
    shard_urls,
)


def _all_files(url: str) -> list[str]:
    fs, path = filesystem(url)
    return fs.find(path) if fs.exists(path) else []


def test_dropped_writer_leaves_nothing(storage_root, make_tile):
    writer = ShardWriter(storage_root, 0)
    writer.add(0, *make_tile(0))
    del writer
    gc.collect()
    assert _all_files(storage_root) == []
    assert committed_shards(storage_root) == set()
    assert list(read_samples(storage_root)) == []


def test_failed_add_leaves_nothing_and_the_writer_usable(storage_root, make_tile):
    writer = ShardWriter(storage_root, 0)
    image, annotation = make_tile(0)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        writer.add(0, image.astype(np.float32), annotation)
    with pytest.raises(ValueError, match="unknown cell class 'CANCER'"):
        writer.add(0, image, {**annotation, "labels": ["CANCER"]})
    with pytest.raises(ValueError, match="not inside the 64x64 tile"):
        writer.add(0, image, {**annotation, "boxes": [[0, 0, 65, 10]]})
    assert _all_files(storage_root) == []
    writer.add(0, image, annotation)  # the failures above left no half sample behind
    writer.commit()
    assert [s["key"] for s in read_samples(storage_root)] == ["000000000"]


def test_commit_writes_tar_then_stats_marker(storage_root, make_tile):
    writer = ShardWriter(storage_root, 7)
    for i in (70, 71):
        writer.add(i, *make_tile(i, boxes=[[1, 1, 5, 5], [2, 2, 9, 9]], labels=["ASC-H", "ASC-H"]))
    stats = writer.commit({"seconds": 1.5, "replica": "w3"})
    assert list_names(storage_root + "/shards") == ["000007.tar"]  # tars only: readers take the folder as it is
    assert list_names(storage_root + "/stats") == ["000007.json"]
    assert committed_shards(storage_root) == {7}
    assert read_shard_stats(storage_root, 7) == stats
    assert stats["shard"] == 7 and stats["tiles"] == 2 and stats["replica"] == "w3" and stats["seconds"] == 1.5
    assert stats["cells"] == {"ASC-US": 0, "ASC-H": 4, "LSIL": 0, "HSIL": 0}
    assert stats["normal_cells"] == 2
    assert [row["key"] for row in stats["samples"]] == ["000000070", "000000071"]
    assert stats["tar_bytes"] == len(get_bytes(shard_url(storage_root, 7)))
    with pytest.raises(RuntimeError, match="already committed"):
        writer.add(72, *make_tile(72))


def test_an_orphan_tar_without_its_marker_is_not_a_shard(storage_root, make_tile):
    writer = ShardWriter(storage_root, 0)
    writer.add(0, *make_tile(0))
    writer.commit()
    fs, path = filesystem(storage_root)
    fs.pipe_file(path + "/shards/000001.tar", get_bytes(shard_url(storage_root, 0)))  # as after a crash
    assert committed_shards(storage_root) == {0}
    assert shard_urls(storage_root + "/shards/*.tar") == [fs.unstrip_protocol(path + "/shards/000000.tar")]
    assert [s["tile_index"] for s in read_samples(storage_root)] == [0]


def test_failed_local_commit_leaves_no_temp_files_and_no_marker(tmp_path, make_tile):
    out = str(tmp_path / "out")
    os.makedirs(out + "/shards/000000.tar")  # a folder where the tar must go: the rename fails
    writer = ShardWriter(out, 0)
    writer.add(0, *make_tile(0))
    with pytest.raises(StorageError) as failure:
        writer.commit()
    assert "000000.tar" in str(failure.value) and "\n" not in str(failure.value)
    assert os.listdir(out + "/shards") == ["000000.tar"]  # just the obstacle
    assert committed_shards(out) == set()


def test_a_writer_killed_mid_write_leaves_only_a_hidden_temp_file_which_the_sweep_removes(tmp_path):
    out = tmp_path / "out"
    put_bytes(str(out / "samples" / "step_000004.png"), b"whole")
    killed_mid_write = (
        "import os, signal, sys\n"
        "from cytosynth.storage.objects import open_whole\n"
        "with open_whole(sys.argv[1]) as f:\n"
        "    f.write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", killed_mid_write, str(out / "samples" / "step_000008.png")], check=False)
    [leftover] = [n for n in os.listdir(out / "samples") if n != "step_000004.png"]
    assert leftover.startswith(".tmp-step_000008.png.")  # hidden, and never under the real name

    assert remove_temp_files(str(out)) == [f"samples/{leftover}"]
    assert os.listdir(out / "samples") == ["step_000004.png"]  # finished files stay
    assert remove_temp_files(str(out)) == [] and remove_temp_files(str(tmp_path / "missing")) == []


def test_an_object_store_has_no_temp_files_to_sweep():
    put_bytes("memory://sweep/out/.tmp-looks-like-one", b"an object a user named so")
    assert remove_temp_files("memory://sweep/out") == []
    assert get_bytes("memory://sweep/out/.tmp-looks-like-one") == b"an object a user named so"


def test_shard_bytes_do_not_depend_on_add_order(tmp_path, make_tile):
    tiles = {i: make_tile(i) for i in range(4)}
    for name, order in (("a", [0, 1, 2, 3]), ("b", [3, 1, 0, 2])):
        writer = ShardWriter(str(tmp_path / name), 0)
        for i in order:
            writer.add(i, *tiles[i])
        writer.commit()
    assert (tmp_path / "a/shards/000000.tar").read_bytes() == (tmp_path / "b/shards/000000.tar").read_bytes()


def test_png_encoding_is_deterministic(make_tile):
    image, _ = make_tile(5)
    assert encode_image(image, "png") == encode_image(image.copy(), "png")


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_formats_round_trip_closely(tmp_path, make_tile, fmt):
    image = np.full((64, 64, 3), 128, np.uint8)
    image[16:48, 16:48] = (200, 40, 90)
    _, annotation = make_tile(0)
    writer = ShardWriter(str(tmp_path), 0, image_format=fmt)
    writer.add(0, image, annotation)
    writer.commit()
    (sample,) = read_samples(str(tmp_path))
    assert np.abs(sample["image"].astype(int) - image).mean() < 3
    assert os.path.exists(tmp_path / "shards" / "000000.tar")
