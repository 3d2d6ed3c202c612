"""README "Reading the data": every code block runs as written, top to bottom, against one small
output (2 shards of one 64x64 tile each, written by ShardWriter as generate writes them), local and on
(moto) S3, with `out` (python) / `$OUT` (shell) set to its URL; and the issue's "done when":
Ray Data and Hugging Face `datasets` take the shards folder itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
from reading_helpers import SIZE, tile, write_output
from training_helpers import RAY_SETTINGS, moto_bucket

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Reading the data"
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# One tile per shard: the torchvision recipe's training step costs about 2.5 CPU seconds per image
# (512 sampled RoIs through a 12544x1024 box head), whatever the tile size.
SHARDS, TILES = 2, 2
KEYS = [f"{i:09d}" for i in range(TILES)]


def reading_blocks() -> list[tuple[str, str]]:
    """(language, code) of each python/bash block of the README section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    return _BLOCK.findall(text[start:end if end >= 0 else None])


def test_the_section_has_a_recipe_for_every_client():
    code = "\n".join(block for _, block in reading_blocks())
    for client in ("committed_shard_urls", "webdataset_pipeline", "ShardDetectionDataset", "load_dataset(\"webdataset\"",
                   "ray.data.read_webdataset", "ray_dataset", "export-coco", "pycocotools", "read_parquet"):
        assert client in code, client


@pytest.fixture(scope="module")
def outputs(s3_server, tmp_path_factory):
    """{"local": a folder, "s3": the same output copied to a moto bucket}; for the module, the AWS
    environment points at the moto server."""
    local = write_output(str(tmp_path_factory.mktemp("reading") / "out"), shards=SHARDS, per_shard=TILES // SHARDS)
    with moto_bucket(s3_server, "readme-reading") as bucket:
        s3fs.S3FileSystem().put(local + "/", bucket.removeprefix("s3://") + "/run1", recursive=True)
        yield {"local": local, "s3": bucket + "/run1"}


@pytest.fixture(scope="module")
def ray_session(outputs):
    """One local Ray for the module, started inside the moto environment (its workers inherit it)."""
    import ray

    ray.init(**RAY_SETTINGS)
    yield
    ray.shutdown()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Hugging Face `datasets`, its caches inside the test's folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install -e .[test])")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf" / "datasets"))
    return datasets


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, the CLI)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_every_reading_recipe_runs_as_written(outputs, ray_session, backend, tmp_path, monkeypatch, hf_cache):
    out = outputs[backend]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"out": out}
    # The shell blocks' `cytosynth` is this checkout's, with this interpreter.
    env = {**os.environ, "OUT": out, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for language, code in reading_blocks():
        started, cpu = time.perf_counter(), cpu_seconds()
        if language == "python":
            exec(compile(code, f"README.md ({SECTION})", "exec"), namespace)
        else:
            subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True, env=env)
        # What each recipe costs (pytest -s): wall and CPU seconds, child processes included.
        print(f"{time.perf_counter() - started:6.1f} s {cpu_seconds() - cpu:6.1f} s CPU  {code.splitlines()[0]}")
    # The blocks ran; what they read is the dataset that was written.
    assert len(namespace["shards"]) == SHARDS
    assert namespace["image"]["file_name"].endswith(".png") and (work / namespace["path"]).exists()
    assert len(namespace["manifest"]) == TILES
    first = int(namespace["first"].tile_index)
    np.testing.assert_array_equal(np.asarray(namespace["tile"]), tile(first)[0])  # one ranged read, the tile
    assert namespace["row"]["image"].shape == (SIZE, SIZE, 3)
    assert namespace["ds"].num_rows == TILES


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_ray_data_reads_the_shards_folder_itself(outputs, ray_session, backend):
    import ray

    rows = ray.data.read_webdataset(outputs[backend] + "/shards").take_all()
    assert sorted(row["__key__"] for row in rows) == KEYS
    assert all(row["png"].shape == (SIZE, SIZE, 3) and row["json"]["width"] == SIZE for row in rows)


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_loads_the_shards_folder_itself(outputs, hf_cache, streaming):
    ds = hf_cache.load_dataset("webdataset", data_dir=outputs["local"] + "/shards", split="train", streaming=streaming)
    rows = list(ds)
    assert sorted(row["__key__"] for row in rows) == KEYS
    assert all(row["png"].size == (SIZE, SIZE) and row["json"]["width"] == SIZE for row in rows)


def test_hugging_face_loads_a_glob_over_the_s3_shards_folder(outputs, hf_cache):
    # datasets takes an s3:// data_dir for a local path; a data_files glob goes through fsspec.
    ds = hf_cache.load_dataset("webdataset", data_files={"train": outputs["s3"] + "/shards/*.tar"}, split="train")
    rows = list(ds)
    assert sorted(row["__key__"] for row in rows) == KEYS
    assert all(row["png"].size == (SIZE, SIZE) and row["json"]["width"] == SIZE for row in rows)
