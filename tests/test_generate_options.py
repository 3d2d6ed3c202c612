"""`cytosynth generate` promises of the README checked on small runs (tiny preset, phantom normal
tiles, 256 px, few steps, in this process): the order its files appear in, the progress bar,
--class-weights and --image-format as typed on the command line, the 25-step / 5.0 defaults."""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cytosynth import storage
from cytosynth.jobs.cli import main

pytestmark = pytest.mark.slow  # each a real generate run: 5-15 s on a loaded 2-core machine

SMALL = ("--normal-source", "phantom", "--tile-size", "256", "--cells", "1-1", "--device", "cpu")


def generate(out: str, *extra: str, quiet: bool = True) -> int:
    """One small job; later options in `extra` override the ones here."""
    return main(["generate", "--out", out, "--num-tiles", "2", "--tiles-per-shard", "1", "--steps", "1", *SMALL,
                 *(["--quiet"] if quiet else []), *extra])


def config_of(out: str) -> dict[str, Any]:
    return json.loads(storage.get_bytes(storage.join(out, "job.json")))["config"]


# --------------------------------------------------------------------------- write order


class AppearanceOrder(dict):
    """An fsspec memory store that remembers the order in which paths became visible."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def __setitem__(self, path: str, value: Any) -> None:
        self.order.append(path)
        super().__setitem__(path, value)


class OrderedMemoryFileSystem(MemoryFileSystem):
    """`ordered://`: fsspec's memory filesystem with its own store, which records each write as the
    object appears (a MemoryFile enters the store when it is closed, whole)."""

    protocol = "ordered"
    store = AppearanceOrder()
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("ordered://"))


@pytest.fixture
def ordered_out() -> str:
    fsspec.register_implementation("ordered", OrderedMemoryFileSystem, clobber=True)
    OrderedMemoryFileSystem.store.clear()
    OrderedMemoryFileSystem.store.order.clear()
    yield "ordered://job/out"
    OrderedMemoryFileSystem.store.clear()


def test_job_json_appears_first_and_success_last_after_the_manifest(ordered_out):
    assert generate(ordered_out) == 0
    store = OrderedMemoryFileSystem.store
    # What the output holds, in the order it appeared (the writability probe is gone again).
    names = [path.removeprefix("/job/out/") for path in store.order if path in store]
    assert len(names) == len(set(names)), names  # each object written once, whole
    assert names[0] == "job.json" and names[-1] == "_SUCCESS", names
    assert set(names) == {"job.json", "shards/000000.tar", "shards/000001.tar", "stats/000000.json",
                          "stats/000001.json", "manifest.parquet", "preview.png", "_SUCCESS"}
    shard_files = [i for i, name in enumerate(names) if name.startswith(("shards/", "stats/"))]
    assert names.index("manifest.parquet") > max(shard_files)  # built from every committed shard
    for shard in ("000000", "000001"):  # a shard's commit marker after its tar
        assert names.index(f"stats/{shard}.json") > names.index(f"shards/{shard}.tar")


# --------------------------------------------------------------------------- progress, options


def test_without_quiet_a_progress_bar_counts_the_tiles_on_stderr(tmp_path, capsys):
    assert generate(str(tmp_path / "out"), quiet=False) == 0
    captured = capsys.readouterr()
    assert "generate: 100%" in captured.err and "2/2" in captured.err and "tile/s" in captured.err, captured.err
    assert "100%" not in captured.out and "cytosynth: wrote 2 tiles" in captured.out


def test_class_weights_from_the_command_line_decide_the_classes(tmp_path):
    out = str(tmp_path / "out")
    assert generate(out, "--class-weights", "LSIL=1,HSIL=0", "--cells", "2-2") == 0
    labels = [label for sample in storage.read_samples(out) for label in sample["json"]["labels"]]
    assert len(labels) == 4 and set(labels) == {"LSIL"}  # uniform weights: 4 LSIL of 4 in 1 of 256 runs
    assert config_of(out)["class_weights"] == {"LSIL": 1.0, "HSIL": 0.0}


def test_a_class_weight_of_an_unknown_class_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        generate(str(out), "--class-weights", "LSIL=1,CANCER=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "unknown class 'CANCER'" in err[-1] and not out.exists()


@pytest.fixture(scope="module")
def png_tiles(tmp_path_factory) -> dict[str, np.ndarray]:
    out = str(tmp_path_factory.mktemp("png") / "out")
    assert generate(out) == 0
    return {s["key"]: s["image"] for s in storage.read_samples(out)}


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_lossy_image_formats_through_generate_store_close_tiles_of_that_format(png_tiles, tmp_path, image_format):
    out = str(tmp_path / "out")
    assert generate(out, "--image-format", image_format) == 0
    with tarfile.open(os.path.join(out, "shards", "000000.tar")) as tar:
        assert {name.split(".", 1)[1] for name in tar.getnames()} == {"json", image_format}
    samples = {s["key"]: s["image"] for s in storage.read_samples(out)}
    assert samples.keys() == png_tiles.keys()
    for key, image in samples.items():
        difference = np.abs(image.astype(int) - png_tiles[key].astype(int))
        assert image.shape == png_tiles[key].shape and 0 < difference.mean() < 3, (key, difference.mean())
    assert config_of(out)["image_format"] == image_format
    assert set(storage.read_manifest(out).column("image_format").to_pylist()) == {image_format}


def test_the_samplers_default_to_the_papers_25_ddim_steps_and_cfg_5(tmp_path):
    # A plan that edits no cell keeps the run short (phantom tile, no diffusion); the settings are
    # those the job records and hands to both samplers.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tiles": {}, "default": "none"}))
    out = str(tmp_path / "out")
    assert main(["generate", "--out", out, "--num-tiles", "1", "--plan", str(plan), *SMALL, "--quiet"]) == 0
    config = config_of(out)
    assert (config["steps"], config["guidance"]) == (25, 5.0)
    (sample,) = storage.read_samples(out)
    assert (sample["json"]["params"]["steps"], sample["json"]["params"]["guidance"]) == (25, 5.0)
