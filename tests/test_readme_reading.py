"""README "Reading the data": every code block runs as written, top to bottom, against a real
generated output, local and on (moto) S3, with `out` (python) / `$OUT` (shell) set to its URL."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from cytosynth.cluster.job import GenerateConfig
from cytosynth.cluster.runner import Runtime, run_local

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Reading the data"
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)


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


def generate(out: str) -> None:
    config = GenerateConfig(out=out, num_tiles=4, tiles_per_shard=2, tile_size=256, steps=2, normal_source="phantom")
    run_local(config, Runtime(device="cpu", progress=False))


@pytest.fixture
def ray_shut_down_after():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the Ray Data block starts a local Ray with this test's environment (S3 endpoint)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep Hugging Face `datasets` caches inside the test's folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    try:
        import datasets.config
    except ImportError:
        pytest.skip("Hugging Face datasets is not installed (pip install -e .[test])")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf" / "datasets"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_every_reading_recipe_runs_as_written(backend, request, tmp_path, monkeypatch, hf_cache, ray_shut_down_after):
    out = str(tmp_path / "out") if backend == "local" else request.getfixturevalue("s3_bucket") + "/run1"
    generate(out)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"out": out}
    for language, code in reading_blocks():
        started = time.perf_counter()
        if language == "python":
            exec(compile(code, f"README.md ({SECTION})", "exec"), namespace)
        else:
            subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True, env={**os.environ, "OUT": out})
        print(f"{time.perf_counter() - started:6.1f} s  {code.splitlines()[0]}")
    # The blocks ran; what they read is the dataset that was written.
    assert len(namespace["shards"]) == 2
    assert namespace["image"]["file_name"].endswith(".png") and (work / namespace["path"]).exists()
    assert len(namespace["manifest"]) == 4
    assert namespace["row"]["image"].shape == (256, 256, 3)
    assert namespace["ds"].num_rows == 4
