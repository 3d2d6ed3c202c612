"""End-to-end tests of the `cytosynth generate` job: the output contract, determinism, resume,
S3, bad input, real-to-synthetic, plans and detectors (docs/design.md §3-4).

The CLI runs in-process (`cytosynth.jobs.cli.main`) on the tiny preset with phantom normal tiles
(stage 2 only) and few DDIM steps, on CPU; one test runs the real console script (the README's
demo command). A shared baseline job (6 tiles, 3 shards of 2, seed 0) is generated once per module
and compared against by the determinism and resume tests.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from cytosynth.jobs.cli import main
from cytosynth.storage import read_manifest
from cytosynth.synth import SynthesisSettings, draw_phantom_tile, random_bundle, save_bundle, tile_seed
from cytosynth.synth.detector import build_fasterrcnn, save_detector
from cytosynth.synth.paste import edit_region

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TILE = 1024
# The paper's order, fixed by the data contract (docs/design.md §3); spelled out, not imported.
CATEGORY_IDS = {"ASC-US": 1, "ASC-H": 2, "LSIL": 3, "HSIL": 4}
# Fast and deterministic: stage 2 only (phantom normal tiles), 3 DDIM steps, CPU, no progress bar.
FAST = ("--normal-source", "phantom", "--steps", "3", "--device", "cpu", "--quiet")
BASELINE_TILES, BASELINE_TPS = 6, 2


def generate(out, *extra, num_tiles: int | None = BASELINE_TILES, tiles_per_shard: int = BASELINE_TPS, seed: int = 0) -> int:
    """Run `cytosynth generate` in-process; later options in `extra` override the defaults here."""
    argv = ["generate", "--out", str(out), "--tiles-per-shard", str(tiles_per_shard), "--seed", str(seed), *FAST]
    if num_tiles is not None:
        argv += ["--num-tiles", str(num_tiles)]
    return main([*argv, *map(str, extra)])


# --------------------------------------------------------------------------- reading outputs


def tar_members(tar_path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a shard, in tar order, with plain `tarfile`."""
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_tiles(out: Path) -> dict[int, dict]:
    """Every sample of every shard under `out` (plain tarfile): tile index -> {shard, key, json, png}.

    Fails if a tile appears twice or a sample lacks its json or png.
    """
    tiles: dict[int, dict] = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        shard = int(tar_path.stem)
        samples: dict[str, dict] = {}
        for name, data in tar_members(tar_path):
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
        for key, sample in samples.items():
            assert set(sample) == {"json", "png"}, f"{tar_path.name}: sample {key} has members {sorted(sample)}"
            index = int(key)
            assert index not in tiles, f"tile {index} is in shard {tiles.get(index, {}).get('shard')} and {shard}"
            tiles[index] = {"shard": shard, "key": key, "json": json.loads(sample["json"]), "png": sample["png"]}
    return tiles


def image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root`: relative path -> (inode, mtime_ns, bytes). Equal snapshots mean
    nothing was written, replaced or added."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        files[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return files


def outside_edit_regions(ann: dict) -> np.ndarray:
    """Mask of the pixels no edit of this tile may touch: outside every box grown by the feather."""
    keep = np.ones((ann["height"], ann["width"]), bool)
    for box in ann["boxes"]:
        x0, y0, x1, y1 = edit_region(box, ann["width"], ann["params"]["feather"])
        keep[y0:y1, x0:x1] = False
    return keep


def assert_rejected(rc: int, capsys: pytest.CaptureFixture, out: Path | None, *fragments: str) -> str:
    """Bad input: non-zero exit, exactly one `error:` line on stderr naming the problem, no
    traceback, and nothing committed under `out`."""
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    if out is not None:
        assert_nothing_committed(out)
    return err


def assert_nothing_committed(out: Path) -> None:
    if not out.exists():
        return
    assert not (out / "_SUCCESS").exists()
    assert not (out / "manifest.parquet").exists()
    assert not (out / "job.json").exists()
    assert not list(out.glob("shards/*")), sorted(p.name for p in out.glob("shards/*"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted job: 6 tiles, 3 shards of 2, seed 0, default batch size (4)."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    assert generate(out) == 0
    return out


@pytest.fixture(scope="module")
def baseline_tiles(baseline) -> dict[int, dict]:
    return read_tiles(baseline)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny preset's random models saved as a model bundle (diffusers folders, safetensors)."""
    return save_bundle(random_bundle("tiny"), tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def copy_of_baseline(baseline, tmp_path) -> Path:
    """The baseline job's output, copied with its timestamps: a finished run of the same command."""
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    return out


# --------------------------------------------------------------------------- 1. output contract


def test_preview_command_draws_the_contact_sheet_of_any_output(baseline, tmp_path, capsys):
    copy = tmp_path / "dataset"
    shutil.copytree(baseline, copy)
    (copy / "preview.png").unlink()
    assert main(["preview", str(copy), "--max-tiles", "4"]) == 0
    with Image.open(copy / "preview.png") as sheet:
        assert sheet.format == "PNG" and sheet.width >= 256
    assert "preview.png" in capsys.readouterr().out
    assert main(["preview", str(tmp_path / "no-such-dataset")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_output_holds_job_json_shards_manifest_preview_and_success(baseline):
    assert (baseline / "job.json").is_file()
    assert sorted(p.name for p in (baseline / "shards").iterdir()) == [f"{s:06d}.tar" for s in range(3)]  # tars only
    assert sorted(p.name for p in (baseline / "stats").iterdir()) == [f"{s:06d}.json" for s in range(3)]  # the markers
    assert (baseline / "manifest.parquet").is_file()
    with Image.open(baseline / "preview.png") as preview:
        assert preview.format == "PNG" and preview.width > 0
    assert (baseline / "_SUCCESS").is_file()
    success = json.loads((baseline / "_SUCCESS").read_text())
    assert success["tiles"] == BASELINE_TILES and success["shards"] == 3
    # No temp files or write probes are left behind.
    leftovers = [p.name for p in baseline.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_job_json_records_the_config_versions_and_model_fingerprints(baseline):
    job = json.loads((baseline / "job.json").read_text())
    config = job["config"]
    assert config["num_tiles"] == BASELINE_TILES and config["tiles_per_shard"] == BASELINE_TPS
    assert config["seed"] == 0 and config["steps"] == 3 and config["normal_source"] == "phantom"
    assert set(config["models"]) >= {"vae", "text_encoder", "unet", "acs_unet"}
    assert job["versions"]["cytosynth"]


def test_every_tile_index_is_in_exactly_one_shard_under_its_9_digit_key(baseline, baseline_tiles):
    assert sorted(baseline_tiles) == list(range(BASELINE_TILES))  # read_tiles fails on duplicates
    for index, tile in baseline_tiles.items():
        assert tile["key"] == f"{index:09d}"
        assert tile["shard"] == index // BASELINE_TPS  # tiles [s*K, (s+1)*K) in shard s
        assert tile["json"]["tile_index"] == index
    # Each shard: <key>.json then <key>.png per sample, in tile order.
    names = [name for name, _ in tar_members(baseline / "shards" / "000001.tar")]
    assert names == ["000000002.json", "000000002.png", "000000003.json", "000000003.png"]


def test_sample_json_follows_the_data_contract(baseline_tiles):
    for index, tile in baseline_tiles.items():
        ann = tile["json"]
        assert ann["seed"] == tile_seed(0, index)
        assert ann["width"] == TILE and ann["height"] == TILE
        assert image(tile["png"]).shape == (TILE, TILE, 3)
        assert 1 <= len(ann["boxes"]) <= 8
        assert len(ann["labels"]) == len(ann["boxes"])
        assert set(ann["labels"]) <= set(CATEGORY_IDS)
        assert ann["category_ids"] == [CATEGORY_IDS[label] for label in ann["labels"]]
        for x0, y0, x1, y1 in ann["boxes"] + ann["normal_boxes"]:
            assert 0 <= x0 < x1 <= TILE and 0 <= y0 < y1 <= TILE
        assert isinstance(ann["normal_boxes"], list)
        assert ann["source"] == "synthetic"
        assert ann["params"]["steps"] == 3 and ann["params"]["tile_size"] == TILE
        assert ann["models"]["detector"] == "classical"
        assert set(ann["models"]) >= {"vae", "text_encoder", "unet", "acs_unet", "detector"}
    # The phantom tiles are full of cells: the detector finds them, so NILM boxes are annotated.
    assert sum(len(t["json"]["normal_boxes"]) for t in baseline_tiles.values()) > 0


def test_webdataset_reads_every_sample_of_the_shards(baseline, baseline_tiles):
    urls = [str(p) for p in sorted((baseline / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(BASELINE_TILES)]
    for sample in samples:
        tile = baseline_tiles[int(sample["__key__"])]
        assert json.loads(sample["json"]) == tile["json"]
        assert sample["png"] == tile["png"]


def test_manifest_has_one_row_per_sample_matching_the_shards(baseline, baseline_tiles):
    rows = read_manifest(str(baseline)).to_pylist()
    assert [r["tile_index"] for r in rows] == list(range(BASELINE_TILES))
    for row in rows:
        ann = baseline_tiles[row["tile_index"]]["json"]
        assert row["key"] == f"{row['tile_index']:09d}"
        assert row["shard"] == baseline_tiles[row["tile_index"]]["shard"]
        assert row["seed"] == ann["seed"]
        assert row["boxes"] == ann["boxes"]
        assert row["labels"] == ann["labels"]
        assert row["source"] == ann["source"]
        assert (row["width"], row["height"]) == (TILE, TILE)


# --------------------------------------------------------------------------- 2. determinism


def test_same_seed_gives_byte_identical_shards(baseline, tmp_path):
    assert generate(tmp_path / "again") == 0
    assert shard_bytes(tmp_path / "again") == shard_bytes(baseline)
    assert (tmp_path / "again" / "manifest.parquet").read_bytes() == (baseline / "manifest.parquet").read_bytes()


def test_bf16_models_edit_the_same_cells_and_leave_the_rest_of_the_tile_bit_identical(baseline, baseline_tiles, tmp_path):
    """bf16 (the default on CUDA) runs on CPU too: same plan and boxes as fp32, edits differ only
    at rounding level, and invariant 2 (locality) holds."""
    out = tmp_path / "bf16"
    assert generate(out, "--precision", "bf16") == 0
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert {s["precision"] for s in stats} == {"bfloat16"}
    assert {json.loads(p.read_text())["precision"] for p in (baseline / "stats").glob("*.json")} == {"float32"}
    for index, tile in read_tiles(out).items():
        fp32 = baseline_tiles[index]
        assert (tile["json"]["boxes"], tile["json"]["labels"]) == (fp32["json"]["boxes"], fp32["json"]["labels"])
        keep = outside_edit_regions(tile["json"])
        got, reference = image(tile["png"]), image(fp32["png"])
        np.testing.assert_array_equal(got[keep], reference[keep])
        assert not np.array_equal(got[~keep], reference[~keep])


def test_boxes_cell_annotates_each_painted_cells_extent_inside_its_painted_box_and_changes_no_pixel(
    baseline_tiles, tmp_path
):
    out = tmp_path / "cell"
    assert generate(out, "--boxes", "cell", num_tiles=2) == 0
    for index, tile in read_tiles(out).items():
        ann, default = tile["json"], baseline_tiles[index]["json"]
        np.testing.assert_array_equal(image(tile["png"]), image(baseline_tiles[index]["png"]))
        assert ann["painted_boxes"] == default["boxes"] and ann["labels"] == default["labels"]
        assert "painted_boxes" not in default and ann["params"]["boxes"] == "cell"
        for (x0, y0, x1, y1), (px0, py0, px1, py1) in zip(ann["boxes"], ann["painted_boxes"]):
            assert px0 <= x0 < x1 <= px1 and py0 <= y0 < y1 <= py1


def test_different_seed_gives_different_tiles_with_seeds_from_job_seed_and_index(baseline_tiles, tmp_path):
    assert generate(tmp_path / "seed1", num_tiles=2, seed=1) == 0
    tiles = read_tiles(tmp_path / "seed1")
    assert sorted(tiles) == [0, 1]
    for index, tile in tiles.items():
        assert tile["json"]["seed"] == tile_seed(1, index) != tile_seed(0, index)
        assert tile["png"] != baseline_tiles[index]["png"]
    assert [t["json"]["boxes"] for t in tiles.values()] != [baseline_tiles[i]["json"]["boxes"] for i in tiles]


@pytest.mark.parametrize(
    ("batch_size", "tiles_per_shard"),
    [(1, 3), (3, 3), (3, 1)],
    ids=["batch1-shard3", "batch3-shard3", "batch3-shard1"],
)
def test_tile_annotations_do_not_depend_on_batch_size_or_tiles_per_shard(
    baseline_tiles, tmp_path, batch_size, tiles_per_shard
):
    # Baseline: batch size 4 and 2 tiles per shard, i.e. model calls of 2 tiles.
    out = tmp_path / "out"
    assert generate(out, "--batch-size", batch_size, num_tiles=4, tiles_per_shard=tiles_per_shard) == 0
    tiles = read_tiles(out)
    assert sorted(tiles) == [0, 1, 2, 3]
    for index, tile in tiles.items():
        ann, ref = tile["json"], baseline_tiles[index]["json"]
        assert ann["seed"] == ref["seed"]
        assert ann["boxes"] == ref["boxes"]
        assert ann["labels"] == ref["labels"]
        assert ann["normal_boxes"] == ref["normal_boxes"]
        got, want = image(tile["png"]).astype(int), image(baseline_tiles[index]["png"]).astype(int)
        # Outside the edit regions a tile is the stage-1 (phantom) tile: bit-identical.
        keep = outside_edit_regions(ann)
        np.testing.assert_array_equal(got[keep], want[keep])
        # Inside, the editor's noise comes from (tile seed, cell) alone, but a different batch
        # shape can make CPU kernels (conv/matmul blocking) round floats differently; after
        # the VAE decode that is at most a gray level or so, never a different image.
        assert np.abs(got - want).max() <= 2


# --------------------------------------------------------------------------- 3. resume


def test_resume_rebuilds_only_the_missing_shard_and_equals_an_uninterrupted_run(copy_of_baseline, baseline):
    out = copy_of_baseline
    kept = {name: (out / name).stat() for name in ("shards/000000.tar", "stats/000000.json", "shards/000002.tar", "stats/000002.json")}
    for name in ("shards/000001.tar", "stats/000001.json", "_SUCCESS"):
        (out / name).unlink()

    assert generate(out) == 0

    for name, before in kept.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"
    assert (out / "stats" / "000001.json").is_file()
    assert shard_bytes(out) == shard_bytes(baseline)
    assert (out / "_SUCCESS").is_file()
    assert read_manifest(str(out)).to_pylist() == read_manifest(str(baseline)).to_pylist()


def test_rerun_of_a_complete_job_changes_nothing(copy_of_baseline):
    before = snapshot(copy_of_baseline)
    assert generate(copy_of_baseline) == 0
    assert snapshot(copy_of_baseline) == before


def test_a_different_config_into_the_same_out_is_refused_and_changes_nothing(copy_of_baseline, capsys):
    before = snapshot(copy_of_baseline)
    capsys.readouterr()
    rc = generate(copy_of_baseline, seed=1)
    assert_rejected(rc, capsys, None, "different job config")
    assert snapshot(copy_of_baseline) == before


# --------------------------------------------------------------------------- 4. S3


def test_job_writes_a_complete_dataset_to_s3(s3_bucket, s3_server, baseline):
    import s3fs

    out = f"{s3_bucket}/ds"
    assert generate(out, num_tiles=3) == 0

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    root = out.removeprefix("s3://")
    names = sorted(p.removeprefix(root + "/") for p in fs.find(root))
    assert names == [
        "_SUCCESS", "job.json", "manifest.parquet", "preview.png",
        "shards/000000.tar", "shards/000001.tar", "stats/000000.json", "stats/000001.json",
    ]
    seen: dict[int, dict] = {}
    for shard in (0, 1):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/shards/{shard:06d}.tar"))) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    index = int(member.name.split(".")[0])
                    assert index not in seen
                    seen[index] = json.loads(tar.extractfile(member).read())
    assert sorted(seen) == [0, 1, 2]
    rows = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/manifest.parquet"))).to_pylist()
    assert [(r["tile_index"], r["boxes"], r["labels"], r["seed"]) for r in rows] == [
        (i, seen[i]["boxes"], seen[i]["labels"], seen[i]["seed"]) for i in range(3)
    ]
    assert json.loads(fs.cat_file(f"{root}/_SUCCESS"))["tiles"] == 3
    # Same seeds, same tiles: shard 0 (tiles 0 and 1) has the bytes of the local baseline's.
    assert fs.cat_file(f"{root}/shards/000000.tar") == (baseline / "shards" / "000000.tar").read_bytes()


# --------------------------------------------------------------------------- 5. bad input


def test_model_bundle_with_a_missing_component_is_rejected(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    shutil.rmtree(bundle / "unet")
    rc = generate(tmp_path / "out", "--preset", "tiny", "--model-dir", bundle, num_tiles=1)
    assert_rejected(rc, capsys, tmp_path / "out", "unet")


def test_model_bundle_with_a_corrupt_weight_file_is_rejected(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    rc = generate(tmp_path / "out", "--preset", "tiny", "--model-dir", bundle, num_tiles=1)
    assert_rejected(rc, capsys, tmp_path / "out", "unet")


def test_a_saved_model_bundle_loads_from_model_dir(tiny_bundle, tmp_path):
    # The control for the two tests above: the intact bundle runs, with its weights fingerprinted.
    assert generate(tmp_path / "out", "--preset", "tiny", "--model-dir", tiny_bundle, num_tiles=1) == 0
    models = read_tiles(tmp_path / "out")[0]["json"]["models"]
    assert all(len(models[k]) == 16 and int(models[k], 16) >= 0 for k in ("vae", "unet", "acs_unet"))


def test_sd15_without_model_dir_is_rejected(tmp_path, capsys):
    rc = generate(tmp_path / "out", "--preset", "sd15", num_tiles=1)
    assert_rejected(rc, capsys, tmp_path / "out", "--model-dir")


@pytest.mark.parametrize(
    ("plan_text", "fragment"),
    [
        (json.dumps({"tiles": {"0": [{"box": [1000, 1000, 1100, 1090], "label": "HSIL"}]}}), "outside"),
        (json.dumps({"tiles": {"0": [{"box": [100, 100, 180, 170], "label": "CANCER"}]}}), "CANCER"),
        ('{"tiles": {"0": [', "JSON"),
        ("tiles:\n  0: []\n", "JSON"),  # YAML is not JSON
    ],
    ids=["box-outside-tile", "unknown-class", "truncated-json", "not-json"],
)
def test_bad_plan_is_rejected(tmp_path, capsys, plan_text, fragment):
    plan = tmp_path / "plan.json"
    plan.write_text(plan_text)
    rc = generate(tmp_path / "out", "--plan", plan, num_tiles=2)
    assert_rejected(rc, capsys, tmp_path / "out", "plan", fragment)


def test_missing_plan_file_is_rejected(tmp_path, capsys):
    rc = generate(tmp_path / "out", "--plan", tmp_path / "nope.json", num_tiles=2)
    assert_rejected(rc, capsys, tmp_path / "out", "nope.json")


def _real_tiles(folder: Path, *images: tuple[str, bytes]) -> Path:
    folder.mkdir()
    for name, data in images:
        (folder / name).write_bytes(data)
    return folder


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_real_tile_of_the_wrong_size_is_rejected(tmp_path, capsys):
    real = _real_tiles(tmp_path / "real", ("a.png", _png(np.full((512, 512, 3), 200, np.uint8))))
    rc = generate(tmp_path / "out", "--normal-source", "real", "--real-tiles", real, num_tiles=None)
    assert_rejected(rc, capsys, tmp_path / "out", "512x512")


def test_real_tile_that_is_not_an_image_is_rejected(tmp_path, capsys):
    real = _real_tiles(tmp_path / "real", ("bad.png", b"this is not an image\n"))
    rc = generate(tmp_path / "out", "--normal-source", "real", "--real-tiles", real, num_tiles=None)
    assert_rejected(rc, capsys, tmp_path / "out", "bad.png")


def test_empty_real_tile_folder_is_rejected(tmp_path, capsys):
    real = _real_tiles(tmp_path / "real")
    rc = generate(tmp_path / "out", "--normal-source", "real", "--real-tiles", real, num_tiles=None)
    assert_rejected(rc, capsys, tmp_path / "out", "no images at")


def test_unreachable_s3_endpoint_is_rejected(tmp_path, capsys, monkeypatch):
    with socket.socket() as sock:  # a free port on loopback that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "NO_PROXY": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    rc = generate("s3://bucket/x", num_tiles=1)
    assert_rejected(rc, capsys, None, "s3://bucket/x", "not writable")


def test_output_under_a_regular_file_is_rejected(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    rc = generate(tmp_path / "file" / "out", num_tiles=1)
    assert_rejected(rc, capsys, None, "not writable")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_missing_detector_file_is_rejected(tmp_path, capsys):
    rc = generate(tmp_path / "out", "--detector", tmp_path / "nope.safetensors", num_tiles=1)
    assert_rejected(rc, capsys, tmp_path / "out", "nope.safetensors")


# --------------------------------------------------------------------------- 6. real-to-synthetic


def test_real_to_synthetic_edits_only_inside_the_edit_regions(tmp_path):
    inputs = [draw_phantom_tile(seed)[0] for seed in (101, 202)]
    real = _real_tiles(tmp_path / "real", *((f"tile_{i:03d}.png", _png(t)) for i, t in enumerate(inputs)))
    out = tmp_path / "out"
    assert generate(out, "--normal-source", "real", "--real-tiles", real, num_tiles=None) == 0
    tiles = read_tiles(out)
    assert sorted(tiles) == [0, 1]  # every real tile, in file-name order
    for index, tile in tiles.items():
        ann, got = tile["json"], image(tile["png"])
        assert ann["source"] == "real-to-synthetic"
        assert 1 <= len(ann["boxes"]) <= 8
        keep = outside_edit_regions(ann)
        np.testing.assert_array_equal(got[keep], inputs[index][keep])  # invariant 2, locality
        assert (got[~keep] != inputs[index][~keep]).any()  # and the cells were edited


def test_real_tiles_from_a_job_output_are_its_shards_not_its_preview(baseline, baseline_tiles, tmp_path):
    out = tmp_path / "out"
    assert generate(out, "--normal-source", "real", "--real-tiles", baseline, num_tiles=None) == 0
    tiles = read_tiles(out)
    assert sorted(tiles) == sorted(baseline_tiles)  # preview.png is not a tile
    assert all(tile["json"]["source"] == "real-to-synthetic" for tile in tiles.values())


# --------------------------------------------------------------------------- 7. user plan


def test_user_plan_fixes_the_cells_of_listed_tiles_and_default_none_leaves_others_unedited(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tiles": {"0": [{"box": [100, 100, 180, 170], "label": "HSIL"}]}, "default": "none"}))
    out = tmp_path / "out"
    assert generate(out, "--plan", plan, num_tiles=2) == 0
    tiles = read_tiles(out)
    first, second = tiles[0]["json"], tiles[1]["json"]
    assert (first["boxes"], first["labels"], first["category_ids"]) == ([[100, 100, 180, 170]], ["HSIL"], [4])
    assert (second["boxes"], second["labels"], second["category_ids"]) == ([], [], [])
    # An unedited tile is exactly its stage-1 tile, and its cells are all annotated as NILM.
    np.testing.assert_array_equal(image(tiles[1]["png"]), draw_phantom_tile(tile_seed(0, 1))[0])
    assert second["normal_boxes"]
    assert json.loads((out / "job.json").read_text())["config"]["plan"].startswith("sha256:")


# --------------------------------------------------------------------------- 8. trained detector


def test_trained_detector_is_used_and_fingerprinted(tmp_path):
    # A random-init Faster R-CNN at torchvision's default input size (800 px): ~10 s per tile on
    # CPU, so one tile. The CLI has no size option; the job must still complete.
    weights = tmp_path / "detector.safetensors"
    save_detector(build_fasterrcnn(), weights)
    out = tmp_path / "out"
    assert generate(out, "--detector", weights, num_tiles=1, tiles_per_shard=1) == 0
    ann = read_tiles(out)[0]["json"]
    detector = ann["models"]["detector"]
    assert detector != "classical"
    assert len(detector) == 16 and int(detector, 16) >= 0
    assert json.loads((out / "job.json").read_text())["config"]["models"]["detector"] == detector
    assert 1 <= len(ann["boxes"]) <= 8


# --------------------------------------------------------------------------- stage 1


def test_diffusion_source_generates_tiles_of_the_requested_size(tmp_path):
    out = tmp_path / "out"
    assert generate(out, "--normal-source", "diffusion", "--steps", 2, "--tile-size", 256, num_tiles=2) == 0
    tiles = read_tiles(out)
    assert sorted(tiles) == [0, 1]
    for tile in tiles.values():
        ann = tile["json"]
        assert (ann["width"], ann["height"], ann["source"]) == (256, 256, "synthetic")
        assert image(tile["png"]).shape == (256, 256, 3)
        assert 1 <= len(ann["boxes"]) <= 8
        assert all(0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 for x0, y0, x1, y1 in ann["boxes"])


# --------------------------------------------------------------------------- the replica pipeline


@pytest.mark.parametrize("detector", ["classical", "fasterrcnn"])
def test_the_pipelined_replica_writes_the_tars_of_every_stage_in_series(tmp_path, detector):
    """Detection and paste-back of a batch run on their own thread beside the diffusion of the
    next (batches of one tile, so a shard of three pipelines): not one byte changes. Faster R-CNN
    computes with torch on that thread while stage 1 does on the device thread."""
    from cytosynth.generation.generate_config import GenerateConfig, JobLayout
    from cytosynth.generation.synthesis import load_shard_maker

    weights = None
    if detector == "fasterrcnn":
        weights = str(tmp_path / "detector.safetensors")
        save_detector(build_fasterrcnn(), weights)
    tars, stats = {}, {}
    for depth in (0, 1):
        out = tmp_path / f"depth{depth}"
        config = GenerateConfig(out=str(out), num_tiles=3, tiles_per_shard=3, detector=weights,
                                synthesis=SynthesisSettings(tile_size=256, steps=2, cells=(1, 3)))
        stats[depth] = load_shard_maker(config, "cpu", batch_size=1, pipeline_depth=depth).run(0, JobLayout(3, 3))
        tars[depth] = (out / "shards" / "000000.tar").read_bytes()
    assert tars[1] == tars[0]
    assert sum(stats[1]["cells"].values()) >= 3
    for s in stats.values():  # the committed stats too: busy and idle seconds per stage
        assert set(s["stage_seconds"]) == {"stage1", "detection", "stage2", "paste_back", "encode", "upload"}
        assert set(s["idle_seconds"]) == {"detection", "stage2", "paste_back"}
        assert all(v >= 0 for v in s["idle_seconds"].values())
    # In series nothing waits on a queue; pipelined, the CPU thread waited for stage 1 of batch 0.
    assert stats[0]["idle_seconds"]["detection"] == 0 and stats[1]["idle_seconds"]["detection"] > 0


# --------------------------------------------------------------------------- 9. README demo


def readme_demo_command(readme: str) -> str | None:
    """The first `cytosynth generate ...` command in a fenced block of the README (a line may
    chain it after set-up, `pip install -e . && cytosynth generate ...`; `\\` continues lines).
    Usage synopses with [optional] arguments are not commands."""
    in_block, lines = False, readme.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("cytosynth generate") and "[" not in part:
                return part
    return None


def test_readme_demo_command_runs_and_completes(tmp_path):
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet; its demo command is tested once it does")
    command = readme_demo_command(readme.read_text(encoding="utf-8"))
    assert command, "README.md has no `cytosynth generate` command in a fenced block"
    argv = shlex.split(command)
    # The demo runs from the clone's root (it reads models/mini there); its --out is pointed into
    # this test's temp folder so the test never writes into the repository.
    if "--out" not in argv:
        pytest.fail(f"README demo command has no --out: {command}")
    out_at = argv.index("--out") + 1
    argv[out_at] = str(tmp_path / "demo-out")
    exe = shutil.which("cytosynth")
    assert exe, "the cytosynth console script is not on PATH"
    result = subprocess.run(
        [exe, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(argv[out_at])
    assert (out / "_SUCCESS").is_file()
    num_tiles = int(argv[argv.index("--num-tiles") + 1]) if "--num-tiles" in argv else None
    tiles = read_tiles(out)
    if num_tiles is not None:
        assert sorted(tiles) == list(range(num_tiles))
    assert f"wrote {len(tiles)} tiles" in result.stdout
    assert "Traceback" not in result.stderr
