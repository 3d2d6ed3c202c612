"""Real tiles at scale (issue 15, item 1): a real-tile set is indexed once, from headers alone
(a cytosynth output: from its commit markers alone), the index is kept in the job's output, and
every reader (replica, resume) takes tile i from it by one ranged read, never by listing the set
again or skipping through it.

Jobs here are cheap: 256 px tiles, no abnormal cell (`--cells 0-0`: no stage-2 call, so tile i
of the output is real tile i, pixel for pixel), 1 step, CPU.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import as_markers_before_image_offsets, one_error_line
from cytosynth import storage
from cytosynth.generation.generate_config import GenerateConfig, JobLayout
from cytosynth.generation.real_tiles import RealTileSource
from cytosynth.generation.synthesis import load_shard_maker
from cytosynth.jobs.cli import main
from cytosynth.storage import StorageError
from cytosynth.synth import InvalidInputError, SynthesisSettings

CHEAP = ("--steps", "1", "--tile-size", "256", "--cells", "0-0", "--device", "cpu", "--quiet",
         "--tiles-per-shard", "2", "--normal-source", "real")


def tile(seed: int, width: int = 256, height: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(url: str, tiles: list[np.ndarray]) -> str:
    for i, array in enumerate(tiles):
        storage.put_bytes(storage.join(url, f"tile_{i:03d}.png"), png(array))
    return url


def shard_set(url: str, tiles: list[np.ndarray], per_shard: int = 2) -> str:
    """A cytosynth output of `tiles` (its committed shards are the set)."""
    for shard in range(0, len(tiles), per_shard):
        writer = storage.ShardWriter(url, shard // per_shard)
        for i in range(shard, min(shard + per_shard, len(tiles))):
            h, w = tiles[i].shape[:2]
            writer.add(i, tiles[i], {"tile_index": i, "width": w, "height": h, "seed": i, "boxes": [], "labels": [],
                                     "normal_boxes": [], "source": "real"})
        writer.commit()
    return url


def generate(out, real, *extra) -> int:
    return main(["generate", "--out", str(out), "--real-tiles", str(real), *CHEAP, *map(str, extra)])


def output_images(out: str) -> dict[int, np.ndarray]:
    return {s["tile_index"]: s["image"] for s in storage.read_samples(out)}


def entries(index: storage.ImageIndex) -> list[storage.IndexEntry]:
    return [index.entry(i) for i in range(len(index))]


# --------------------------------------------------------------------------- the index


def test_a_folder_is_indexed_from_image_headers_and_tile_i_is_its_i_th_file(storage_root):
    tiles = [tile(0), tile(1, 64, 48), tile(2)]
    folder = image_folder(storage.join(storage_root, "real"), tiles)
    index = storage.index_image_set(folder)
    assert [index.entry(i) for i in range(3)] == [
        storage.IndexEntry(storage.join(folder, f"tile_{i:03d}.png"), None, None, t.shape[1], t.shape[0])
        for i, t in enumerate(tiles)
    ]
    for i, expected in enumerate(tiles):
        np.testing.assert_array_equal(storage.read_indexed_image(index, i), expected)


def test_a_shard_set_is_indexed_by_its_image_members_and_tile_i_is_one_ranged_read(storage_root):
    tiles = [tile(i) for i in range(5)]
    out = shard_set(storage.join(storage_root, "real"), tiles)
    index = storage.index_image_set(out)
    assert index.from_shards and len(index) == 5
    for i, expected in enumerate(tiles):
        entry = index.entry(i)
        assert entry.url == storage.shard_url(out, i // 2) and (entry.width, entry.height) == (256, 256)
        data = storage.get_bytes(entry.url)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.getmember(f"{storage.sample_key(i)}.png")
        assert (entry.offset, entry.length) == (member.offset_data, member.size)  # the member, nothing else
        np.testing.assert_array_equal(storage.read_indexed_image(index, i), expected)


def test_an_outputs_index_from_its_markers_is_the_one_its_headers_give(storage_root):
    out = shard_set(storage.join(storage_root, "real"), [tile(i, 64, 40 + i) for i in range(5)])
    from_markers = storage.index_image_set(out)
    assert [(e.width, e.height) for e in entries(from_markers)] == [(64, 40 + i) for i in range(5)]
    as_markers_before_image_offsets(out, [1])  # a resumed older output: markers of both kinds
    assert entries(storage.index_image_set(out)) == entries(from_markers)
    as_markers_before_image_offsets(out)  # wholly an older version's: every shard from its headers
    assert entries(storage.index_image_set(out)) == entries(from_markers)


def test_an_outputs_index_reads_its_markers_and_no_tar(tmp_path):
    out = shard_set(str(tmp_path / "real"), [tile(i, 64, 64) for i in range(4)])
    index = storage.index_image_set(out)
    for tar in (tmp_path / "real" / "shards").glob("*.tar"):
        tar.write_bytes(bytes(tar.stat().st_size))  # the size the listing vouches for, no tar in it
    assert entries(storage.index_image_set(out)) == entries(index)


def test_only_an_outputs_committed_shards_are_indexed_in_shard_order(tmp_path):
    tiles = [tile(i, 64, 64) for i in range(6)]
    out = shard_set(str(tmp_path / "real"), tiles)
    storage.uncommit(out, [1])  # its tar stays, invisible
    index = storage.index_image_set(out)
    assert index.urls == (storage.shard_url(out, 0), storage.shard_url(out, 2))
    for position, i in enumerate([0, 1, 4, 5]):
        np.testing.assert_array_equal(storage.read_indexed_image(index, position), tiles[i])


@pytest.mark.parametrize("damage, problem", [
    (lambda tar: tar.write_bytes(tar.read_bytes()[:1000]), "its tar is 1000 bytes, its marker says "),
    (Path.unlink, "its tar is missing"),
])
def test_an_outputs_tar_that_is_not_what_its_marker_says_is_one_line_naming_it(tmp_path, damage, problem):
    out = shard_set(str(tmp_path / "real"), [tile(i, 64, 64) for i in range(4)])
    damage(Path(storage.shard_url(out, 1)))
    with pytest.raises(StorageError, match=rf"^cannot index shard .*000001.tar: {problem}"):
        storage.index_image_set(out)


def test_the_index_round_trips_through_its_parquet_file(storage_root):
    folder = image_folder(storage.join(storage_root, "real"), [tile(0), tile(1, 64, 48)])
    out = shard_set(storage.join(storage_root, "shards"), [tile(i) for i in range(3)])
    for index in (storage.index_image_set(folder), storage.index_image_set(out)):
        url = storage.join(storage_root, "index.parquet")
        storage.write_image_index(index, url)
        back = storage.read_image_index(url)
        assert (back.source, back.from_shards, len(back)) == (index.source, index.from_shards, len(index))
        assert [back.entry(i) for i in range(len(back))] == [index.entry(i) for i in range(len(index))]


def test_a_tar_cut_between_two_samples_is_one_line(tmp_path):
    out = shard_set(str(tmp_path / "src"), [tile(0), tile(1)])
    tar = Path(storage.shard_url(out, 0))
    with tarfile.open(tar) as archive:
        second = archive.getmember(f"{storage.sample_key(1)}.json")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: second.offset])  # whole first sample, no end-of-archive block
    with pytest.raises(StorageError, match="^cannot read shard .*cut.tar: .*end"):
        storage.index_image_set(str(cut))


def test_a_file_that_is_not_an_image_is_one_line_naming_it(tmp_path):
    folder = image_folder(str(tmp_path / "real"), [tile(0)])
    (tmp_path / "real" / "tile_001.png").write_bytes(b"not an image")
    with pytest.raises(StorageError, match="^cannot read image .*tile_001.png"):
        storage.index_image_set(folder)


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_real_to_synthetic_on_s3_stores_the_index_beside_the_job_and_equals_a_local_run(s3_bucket, tmp_path, kind):
    tiles = [tile(i) for i in range(3)]
    make = image_folder if kind == "folder" else shard_set
    assert generate(f"{s3_bucket}/out", make(f"{s3_bucket}/real", tiles)) == 0
    assert generate(tmp_path / "out", make(str(tmp_path / "real"), tiles)) == 0
    s3_index = storage.read_image_index(storage.real_index_url(f"{s3_bucket}/out"))
    assert (s3_index.source, len(s3_index)) == (f"{s3_bucket}/real", 3)
    got = output_images(f"{s3_bucket}/out")
    assert sorted(got) == [0, 1, 2]
    for i, expected in enumerate(tiles):
        np.testing.assert_array_equal(got[i], expected)  # no cells: tile i is real tile i
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "out" / "shards").glob("*.tar"))}
    assert {n: storage.get_bytes(f"{s3_bucket}/out/shards/{n}") for n in local} == local


def test_every_real_tiles_header_size_is_checked_before_anything_is_written(tmp_path, capsys):
    real = image_folder(str(tmp_path / "real"), [tile(0), tile(1), tile(2, 256, 248)])
    assert generate(tmp_path / "out", real, "--num-tiles", "1") == 2  # the wrong tile is not even used
    one_error_line(capsys, "real tile", "tile_002.png is 256x248, expected 256x256")
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_a_corrupt_tile_inside_a_shard_fails_its_shard_when_read_and_keeps_the_earlier_one(tmp_path, capsys):
    real = shard_set(str(tmp_path / "real"), [tile(i) for i in range(4)])
    index = storage.index_image_set(real)
    entry = index.entry(3)
    tar = Path(entry.url)
    data = bytearray(tar.read_bytes())
    middle = entry.offset + entry.length // 2
    data[middle : middle + 64] = bytes(64)  # the header and the tar are intact, the pixels are not
    tar.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert generate(out, real) == 2
    one_error_line(capsys, "000001.tar")
    assert storage.committed_shards(str(out)) == {0}
    assert not (out / "shards" / "000001.tar").exists()  # nothing of shard 1 was written


def test_a_resume_reads_the_index_it_started_with_not_the_changed_set(tmp_path):
    tiles = [tile(i) for i in range(4)]
    real = image_folder(str(tmp_path / "real"), tiles)
    out = tmp_path / "out"
    assert generate(out, real) == 0
    first = {p.name: p.read_bytes() for p in sorted(out.rglob("*.tar"))}
    index_bytes = Path(storage.real_index_url(str(out))).read_bytes()
    storage.uncommit(str(out), [1])
    storage.delete(storage.join(str(out), "_SUCCESS"))
    (tmp_path / "real" / "000_new.png").write_bytes(png(tile(99)))  # a re-listing would shift every tile
    assert generate(out, real) == 0
    assert {p.name: p.read_bytes() for p in sorted(out.rglob("*.tar"))} == first
    assert Path(storage.real_index_url(str(out))).read_bytes() == index_bytes


def test_a_changed_real_tiles_url_into_the_same_output_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(out, image_folder(str(tmp_path / "real"), [tile(0), tile(1)])) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert generate(out, image_folder(str(tmp_path / "other"), [tile(5), tile(6)])) == 2
    one_error_line(capsys, "real_tiles")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_replica_reads_the_jobs_index_not_the_sets_listing(tmp_path):
    """What a Ray replica does (`ShardReplica.load` is `load_shard_maker`, then `run`), in-process."""
    tiles = [tile(i) for i in range(2)]
    real = image_folder(str(tmp_path / "real"), tiles)
    out = str(tmp_path / "out")
    storage.write_image_index(storage.index_image_set(real), storage.real_index_url(out))  # the driver's part
    (tmp_path / "real" / "000_new.png").write_bytes(png(tile(99)))  # a replica that lists would read this first
    config = GenerateConfig(out=out, normal_source="real", real_tiles=real, tiles_per_shard=2,
                            synthesis=SynthesisSettings(tile_size=256, steps=1, cells=(0, 0)))
    worker = load_shard_maker(config, device="cpu")
    worker.run(0, JobLayout(2, 2))
    got = output_images(out)
    for i, expected in enumerate(tiles):
        np.testing.assert_array_equal(got[i], expected)


def test_a_tile_whose_pixels_are_not_the_size_its_index_says_is_refused_when_read(tmp_path):
    real = image_folder(str(tmp_path / "real"), [tile(0)])
    index = storage.index_image_set(real)
    (tmp_path / "real" / "tile_000.png").write_bytes(png(tile(0, 256, 128)))  # replaced after indexing
    with pytest.raises(InvalidInputError, match=r"^real tile .*tile_000.png is 256x128, expected 256x256$"):
        RealTileSource("unused", 256, index)([0], [0])
