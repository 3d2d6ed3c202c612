"""Reading an output as users do (issue 14): the committed-shard list and its one-line errors, the
old layout refused, marker/stats URLs, `cytosynth export-coco`, `webdataset_pipeline` on moto S3,
`ShardDetectionDataset` split over ranks and workers, `ray_dataset` columns, lossless webp and the
manifest's per-sample format columns, all on small shards written by ShardWriter."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from gloo_ranks import epoch_ids, gloo_rank
from reading_helpers import CELLS, PER_SHARD, SIZE, TILES, tile, write_output

from cytosynth import storage
from cytosynth.jobs import cli
from cytosynth.storage import (
    CATEGORY_IDS,
    IMAGE_FORMATS,
    ShardDetectionDataset,
    StorageError,
    committed_shard_urls,
    filesystem,
    marker_url,
    read_manifest,
    read_samples,
    shard_url,
    stats_url,
    webdataset_pipeline,
    write_job_json,
    write_success,
)
from cytosynth.storage.images import image_extension


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    return write_output(str(tmp_path_factory.mktemp("readers") / "out"))


def only_in_fsspec_config(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Say where the store is the way a user can without cytosynth's help: fsspec's configuration
    (``fsspec.config.conf``, or ``$FSSPEC_S3`` at import), no endpoint in the environment."""
    import fsspec.config
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"})
    s3fs.S3FileSystem.clear_instance_cache()


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- shard URLs and markers


def test_stats_url_is_the_marker_folder_beside_shards():
    assert stats_url("s3://bucket/run1", 3) == "s3://bucket/run1/stats/000003.json"
    assert stats_url("out/", 0) == "out/stats/000000.json"
    assert storage.STATS_DIR == "stats" and storage.SHARDS_DIR == "shards"


@pytest.mark.parametrize("out", ["s3://bucket/run1", "/data/out", "memory://x/y"])
def test_marker_url_maps_a_shard_tar_to_its_stats_json(out):
    assert marker_url(shard_url(out, 12)) == stats_url(out, 12)


@pytest.mark.parametrize("tar", ["s3://bucket/other/000001.tar", "/data/shards/train.tar", "000001.tar",
                                 "s3://bucket/run1/shards/000001.tar.gz"])
def test_a_tar_outside_the_output_layout_has_no_marker(tar):
    assert marker_url(tar) is None


def test_committed_shard_urls_lists_the_committed_tars_in_order(output):
    assert committed_shard_urls(output) == [shard_url(output, 0), shard_url(output, 1)]
    assert sorted(os.listdir(Path(output) / "shards")) == ["000000.tar", "000001.tar"]  # tars only
    assert sorted(os.listdir(Path(output) / "stats")) == ["000000.json", "000001.json"]


def test_an_uncommitted_tar_is_not_listed(tmp_path):
    out = write_output(str(tmp_path / "out"))
    Path(stats_url(out, 1)).unlink()
    (Path(out) / "_SUCCESS").unlink()  # a job still running: shard 1's tar is written, its marker not yet
    assert committed_shard_urls(out) == [shard_url(out, 0)]


@pytest.mark.parametrize("make", ["missing", "empty", "other files"])
def test_a_url_that_is_not_an_output_is_one_line_naming_it(tmp_path, make):
    url = tmp_path / "data"
    if make != "missing":
        url.mkdir()
    if make == "other files":
        (url / "notes.txt").write_text("hello")
    with pytest.raises(StorageError) as err:
        committed_shard_urls(str(url))
    assert one_line_error(err) == f"{url} is not a cytosynth output (no job.json and no stats/ folder)"


def test_an_s3_prefix_that_is_not_an_output_is_one_line_naming_it(s3_bucket):
    with pytest.raises(StorageError, match=f"^{s3_bucket}/nothing is not a cytosynth output") as err:
        committed_shard_urls(s3_bucket + "/nothing")
    one_line_error(err)


def test_an_output_with_no_committed_shard_is_one_line_naming_it(tmp_path):
    out = str(tmp_path / "out")
    write_job_json(out, {"test": "readers"})
    with pytest.raises(StorageError) as err:
        committed_shard_urls(out)
    assert one_line_error(err) == f"{out} has no committed shard yet (no stats/*.json)"


def test_a_shard_counted_in_success_but_missing_is_one_line_naming_it(tmp_path):
    out = write_output(str(tmp_path / "out"))
    write_success(out, {"shards": 3})  # the job said 3 shards; stats/ and shards/ hold 2
    with pytest.raises(StorageError) as err:
        committed_shard_urls(out)
    assert one_line_error(err) == f"{out}: shard {shard_url(out, 2)} is committed but missing"


@pytest.mark.parametrize("success, message", [
    (b"garbage{", "_SUCCESS is not valid JSON"),
    (b'{"shards": "two"}', "_SUCCESS: 'shards' is not a shard count: 'two'"),
])
def test_an_unreadable_success_summary_is_one_line_naming_it(tmp_path, success, message):
    out = write_output(str(tmp_path / "out"))
    (Path(out) / "_SUCCESS").write_bytes(success)
    with pytest.raises(StorageError) as err:
        committed_shard_urls(out)
    assert one_line_error(err).startswith(f"{out}/{message}")


def test_a_committed_shard_whose_tar_is_gone_is_one_line_naming_it(storage_root):
    out = write_output(storage_root)
    fs, path = filesystem(shard_url(out, 0))
    fs.rm(path)
    with pytest.raises(StorageError) as err:
        committed_shard_urls(out)
    assert one_line_error(err) == f"{out}: shard {shard_url(out, 0)} is committed but missing"


# --------------------------------------------------------------------------- the old layout


def to_old_layout(out: str) -> None:
    """Markers back beside the tars in shards/, as cytosynth wrote them before stats/."""
    fs, root = filesystem(out)
    for name in ("000000.json", "000001.json"):
        fs.mv(f"{root}/stats/{name}", f"{root}/shards/{name}")
    if fs.isdir(f"{root}/stats"):
        fs.rm(f"{root}/stats", recursive=True)


OLD_LAYOUT = "was written with an older cytosynth layout (commit markers in shards/, now stats/)"


def test_an_output_in_the_old_layout_is_refused_in_one_line(storage_root):
    out = write_output(storage_root)
    to_old_layout(out)
    for read in (committed_shard_urls, lambda url: list(read_samples(url)), storage.committed_shards):
        with pytest.raises(StorageError) as err:
            read(out)
        assert one_line_error(err).startswith(f"{out} {OLD_LAYOUT}; regenerate it, or move shards/*.json to stats/")


def test_export_coco_refuses_the_old_layout_with_one_error_line(tmp_path, capsys):
    out = write_output(str(tmp_path / "out"))
    to_old_layout(out)
    code = cli.main(["export-coco", out, "--images", str(tmp_path / "coco")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {out} {OLD_LAYOUT}") and "\n" not in err, err
    assert not (tmp_path / "coco").exists()


# --------------------------------------------------------------------------- manifest and formats


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_manifest_format_and_byte_range_columns_match_the_tars(tmp_path, image_format):
    out = write_output(str(tmp_path / "out"), image_format)
    rows = {row["key"]: row for row in read_manifest(out).to_pylist()}
    members = {}
    for url in committed_shard_urls(out):
        with tarfile.open(url) as tar:
            members.update({m.name: (m.size, tar.extractfile(m).read(), m.offset_data) for m in tar.getmembers()})
    assert len(rows) == len(TILES) and len(members) == 2 * len(TILES)
    ext = image_extension(image_format)
    for key, row in rows.items():
        annotation = json.loads(members[f"{key}.json"][1])
        assert row["image_format"] == image_format
        assert row["image_bytes"] == members[f"{key}.{ext}"][0] > 0
        assert row["image_offset"] == members[f"{key}.{ext}"][2]  # its bytes: one ranged read of the tar
        assert row["category_ids"] == annotation["category_ids"] == [CATEGORY_IDS[x] for x in CELLS[int(key)]]


def test_webp_lossless_round_trips_pixel_exact(tmp_path):
    out = write_output(str(tmp_path / "out"), "webp-lossless")
    with tarfile.open(shard_url(out, 0)) as tar:
        assert [m.name for m in tar.getmembers()] == ["000000000.json", "000000000.webp", "000000001.json", "000000001.webp"]
    samples = list(read_samples(out))
    assert [s["tile_index"] for s in samples] == list(TILES)
    for sample in samples:
        np.testing.assert_array_equal(sample["image"], tile(sample["tile_index"])[0])
    for sample in webdataset_pipeline(out, shuffle=False):
        np.testing.assert_array_equal(sample["webp"], tile(int(sample["__key__"]))[0])


def test_lossy_webp_is_not_pixel_exact(tmp_path):
    # What the README says: webp (quality 95) and jpg are lossy, webp-lossless and png are not.
    out = write_output(str(tmp_path / "out"), "webp", shards=1)
    sample = next(read_samples(out))
    error = np.abs(sample["image"].astype(int) - tile(0)[0])
    assert error.max() > 0 and error.mean() < 3
    assert storage.LOSSLESS_FORMATS == ("png", "webp-lossless")


# --------------------------------------------------------------------------- export-coco


def export(out: str, images: Path, *labels: str) -> tuple[int, dict]:
    code = cli.main(["export-coco", out, "--images", str(images), *labels])
    return code, json.loads((images / "annotations.json").read_text()) if code == 0 else {}


@pytest.mark.parametrize("labels, categories, boxes_per_tile", [
    ("abnormal", {1: "ASC-US", 2: "ASC-H", 3: "LSIL", 4: "HSIL"},
     lambda i: [CATEGORY_IDS[x] for x in CELLS[i]]),
    ("nilm", {1: "NILM"}, lambda i: [1] * (len(CELLS[i]) + 1)),
    ("all", {1: "ASC-US", 2: "ASC-H", 3: "LSIL", 4: "HSIL", 5: "NILM"},
     lambda i: [CATEGORY_IDS[x] for x in CELLS[i]] + [5]),
])
def test_export_coco_writes_images_and_annotations_of_the_label_set(output, tmp_path, capsys, labels, categories,
                                                                     boxes_per_tile):
    images = tmp_path / "coco"
    code, coco = export(output, images, "--labels", labels)
    assert code == 0 and capsys.readouterr().out.strip() == f"cytosynth: wrote {images / 'annotations.json'}"
    assert set(coco) == {"info", "licenses", "images", "annotations", "categories"}
    assert coco["licenses"] == [] and coco["info"]["description"]
    api = COCO(str(images / "annotations.json"))
    assert {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())} == categories
    assert sorted(api.getImgIds()) == list(TILES)
    for i in TILES:
        info = api.loadImgs(i)[0]
        assert info == {"id": i, "file_name": f"{i:09d}.png", "width": SIZE, "height": SIZE}
        with Image.open(images / info["file_name"]) as image:  # relative to the folder, and there
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), tile(i)[0])
        anns = api.loadAnns(api.getAnnIds(imgIds=[i]))
        assert sorted(a["category_id"] for a in anns) == sorted(boxes_per_tile(i))
    assert sorted(os.listdir(images)) == sorted(["annotations.json", *(f"{i:09d}.png" for i in TILES)])


def test_export_coco_boxes_are_xywh_of_the_shard_boxes(output, tmp_path):
    _, coco = export(output, tmp_path / "coco", "--labels", "all")
    by_image = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
        assert ann["area"] == w * h and ann["iscrowd"] == 0
    for i in TILES:
        assert by_image[i] == tile(i)[1]["boxes"] + tile(i)[1]["normal_boxes"]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_export_coco_reads_an_s3_output_and_extracts_lossy_images_as_stored(s3_bucket, tmp_path):
    out = write_output(s3_bucket + "/run1", "jpg")
    images = tmp_path / "coco"
    code, coco = export(out, images)
    assert code == 0
    assert [img["file_name"] for img in coco["images"]] == [f"{i:09d}.jpg" for i in TILES]
    fs, _ = filesystem(out)
    for i in TILES:
        with fs.open(f"{out}/shards/{i // PER_SHARD:06d}.tar", "rb") as f, tarfile.open(fileobj=f) as tar:
            stored = tar.extractfile(f"{i:09d}.jpg").read()
        assert (images / f"{i:09d}.jpg").read_bytes() == stored
        with Image.open(images / f"{i:09d}.jpg") as image:
            assert image.format == "JPEG" and image.size == (SIZE, SIZE)


def test_export_coco_writes_into_an_s3_folder(output, s3_bucket):
    assert cli.main(["export-coco", output, "--images", s3_bucket + "/coco"]) == 0
    fs, _ = filesystem(s3_bucket)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(s3_bucket + "/coco"))
    assert names == sorted(["annotations.json", *(f"{i:09d}.png" for i in TILES)])


@pytest.mark.parametrize("case", ["not an output", "no committed shard"])
def test_export_coco_bad_output_is_one_error_line_and_nothing_written(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "no committed shard":
        write_job_json(str(out), {"test": "readers"})
    code = cli.main(["export-coco", str(out), "--images", str(tmp_path / "coco")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {out} ") and "\n" not in err, err
    assert not (tmp_path / "coco").exists()


def test_export_coco_refuses_an_unknown_label_set(output, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export-coco", output, "--images", str(tmp_path / "coco"), "--labels", "normal"])
    assert exit_.value.code == 2
    assert "argument --labels: invalid choice: 'normal'" in capsys.readouterr().err
    assert not (tmp_path / "coco").exists()


def test_train_detector_takes_only_the_abnormal_and_nilm_label_sets(output, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train-detector", "--real", output, "--labels", "all", "--out", str(tmp_path / "det")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --labels: invalid choice: 'all'" in err and "abnormal" in err and "nilm" in err, err
    assert not (tmp_path / "det").exists()


# --------------------------------------------------------------------------- webdataset_pipeline


def test_webdataset_pipeline_streams_s3_with_the_endpoint_in_fsspecs_config(s3_bucket, s3_server, monkeypatch):
    out = write_output(s3_bucket + "/run1")
    only_in_fsspec_config(s3_server, monkeypatch)
    samples = list(webdataset_pipeline(out, shuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in TILES]
    for sample in samples:
        image, annotation = tile(int(sample["__key__"]))
        np.testing.assert_array_equal(sample["png"], image)
        assert sample["json"]["boxes"] == annotation["boxes"] and sample["json"]["labels"] == annotation["labels"]


def test_webdataset_pipeline_shuffles_reproducibly_by_seed(output):
    def keys(seed):
        return [s["__key__"] for s in webdataset_pipeline(output, seed=seed, decode=None)]

    first = keys(1)
    assert sorted(first) == [f"{i:09d}" for i in TILES] and keys(1) == first
    assert len({tuple(keys(seed)) for seed in range(6)}) > 1


def test_webdataset_pipeline_draws_a_new_order_each_pass(output):
    pipeline = webdataset_pipeline(output, seed=1, decode=None)
    passes = [tuple(s["__key__"] for s in pipeline) for _ in range(6)]
    assert len(set(passes)) > 1 and all(sorted(p) == [f"{i:09d}" for i in TILES] for p in passes)
    again = webdataset_pipeline(output, seed=1, decode=None)
    assert [tuple(s["__key__"] for s in again) for _ in range(6)] == passes


def test_webdataset_pipeline_raw_samples_keep_bytes_and_parse_json(output):
    sample = next(iter(webdataset_pipeline(output, shuffle=False, decode=None)))
    assert sample["png"][:8] == b"\x89PNG\r\n\x1a\n" and sample["json"]["tile_index"] == 0


def test_webdataset_pipeline_splits_shards_over_ranks_and_workers(output, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loader = torch.utils.data.DataLoader(webdataset_pipeline(output, seed=5, decode=None), batch_size=None,
                                             num_workers=1)
        per_rank.append([s["__key__"] for s in loader])
    assert all(len(keys) == PER_SHARD for keys in per_rank)  # one whole shard each
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:09d}" for i in TILES]


# --------------------------------------------------------------------------- ShardDetectionDataset


def test_shard_detection_dataset_takes_rank_and_world_size_from_the_environment(output, monkeypatch):
    # torchrun and Ray Train set RANK / WORLD_SIZE; webdataset_pipeline reads them the same way.
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dataset = ShardDetectionDataset(output, seed=3)
        assert (dataset.rank, dataset.world_size) == (rank, 2)
        per_rank.append(epoch_ids(dataset, workers=2))
    seen = Counter(per_rank[0] + per_rank[1])
    assert set(seen) == set(TILES) and set(seen.values()) == {1}  # 2 ranks x 2 workers, 2 shards: none twice
    assert all(per_rank)


@pytest.mark.slow
def test_shard_detection_dataset_splits_over_a_gloo_process_group_and_its_workers(output, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    torch.multiprocessing.spawn(gloo_rank, args=(2, output, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    per_rank = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    seen = Counter(per_rank[0] + per_rank[1])
    assert set(seen) == set(TILES) and set(seen.values()) == {1}
    assert all(per_rank)


def test_shard_detection_dataset_targets_are_torchvision_format(output):
    images, targets = zip(*ShardDetectionDataset(output, labels="all", shuffle=False))
    for i, (image, target) in enumerate(zip(images, targets)):
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        torch.testing.assert_close(image, torch.from_numpy(tile(i)[0]).permute(2, 0, 1).float() / 255)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["boxes"].tolist() == tile(i)[1]["boxes"] + tile(i)[1]["normal_boxes"]
        assert target["labels"].tolist() == [CATEGORY_IDS[x] for x in CELLS[i]] + [5]
        assert int(target["image_id"]) == i


# --------------------------------------------------------------------------- ray_dataset


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from training_helpers import RAY_SETTINGS

    ray.init(**RAY_SETTINGS)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_ray_dataset_has_decoded_images_and_box_columns(ray_session, tmp_path, image_format):
    out = write_output(str(tmp_path / "out"), image_format)
    rows = sorted(storage.ray_dataset(out).take_all(), key=lambda row: row["tile_index"])
    assert [row["tile_index"] for row in rows] == list(TILES)
    for row in rows:
        i = row["tile_index"]
        image, annotation = tile(i)
        assert set(row) == set(storage.RAY_COLUMNS)
        assert row["key"] == f"{i:09d}" and row["image_format"] == image_extension(image_format)
        assert row["image"].dtype == np.uint8 and row["image"].shape == (SIZE, SIZE, 3)
        if image_format == "png":
            np.testing.assert_array_equal(row["image"], image)
        else:
            assert np.abs(row["image"].astype(int) - image).mean() < 3
        assert row["boxes"].dtype == np.int32 and row["boxes"].reshape(-1, 4).tolist() == annotation["boxes"]
        assert row["normal_boxes"].reshape(-1, 4).tolist() == annotation["normal_boxes"]
        assert list(row["labels"]) == annotation["labels"]
        assert list(row["category_ids"]) == [CATEGORY_IDS[x] for x in annotation["labels"]]
        assert (row["width"], row["height"]) == (SIZE, SIZE)


@pytest.mark.slow
def test_ray_dataset_reads_s3_with_the_endpoint_in_fsspecs_config(ray_session, s3_bucket, s3_server, monkeypatch):
    out = write_output(s3_bucket + "/run1")
    only_in_fsspec_config(s3_server, monkeypatch)  # the Ray workers have neither: the driver's filesystem travels
    rows = storage.ray_dataset(out).take_all()
    assert sorted(row["tile_index"] for row in rows) == list(TILES)
    for row in rows:
        np.testing.assert_array_equal(row["image"], tile(row["tile_index"])[0])
