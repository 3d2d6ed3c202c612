"""Validation before anything is written (issue 13, items 8, 10, 11, 15): every bad option, plan,
real tile or output folder is one `error:` line (exit 2) and leaves no job.json behind, so the
corrected command runs; an unexpected error is one line plus a log path (test_security.py)."""

from __future__ import annotations

import io
import json
import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytosynth import storage
from cytosynth.jobs.cli import main

CHEAP = ("--normal-source", "phantom", "--steps", "2", "--tile-size", "256", "--cells", "0-0",
         "--device", "cpu", "--quiet")


def generate(out, *extra) -> int:
    return main(["generate", "--out", str(out), "--num-tiles", "1", *CHEAP, *map(str, extra)])


def assert_one_line(rc: int, capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (("--cells", "9-9"), "--cells"), (("--cells", "5-2"), "--cells"), (("--seed", "-5"), "--seed"),
        (("--class-weights", "ASC-US=0,HSIL=0"), "--class-weights"), (("--class-weights", "LSIL=-1"), "--class-weights"),
        (("--class-weights", "LSIL=nan"), "--class-weights"), (("--steps", "0"), "--steps"), (("--steps", "-3"), "--steps"),
        (("--batch-size", "0"), "--batch-size"), (("--batch-size", "-2"), "--batch-size"), (("--guidance", "nan"), "--guidance"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, tuple) else None,
)
def test_a_bad_option_is_one_line_and_writes_nothing(tmp_path, capsys, option, fragment):
    out = tmp_path / "out"
    rc = generate(out, *option)
    assert_one_line(rc, capsys, fragment)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("plan_bytes", "fragment"),
    [
        (json.dumps({"tiles": {"²": []}}).encode(), "tile index"),
        (json.dumps({"tiles": {"9" * 5000: []}}).encode(), "tile index"),
        (b'{"tiles": {"0": [{"box": [' + b"9" * 5000 + b', 0, 10, 10]}]}}', "JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        ('{"tiles": {"0": []}, "default": "none", "x": "\u00e9"}'.encode("latin-1"), "UTF-8"),
    ],
    ids=["superscript-key", "5000-digit-key", "5000-digit-number", "nested-100k", "not-utf8"],
)
def test_a_hostile_plan_is_one_line_and_writes_nothing(tmp_path, capsys, plan_bytes, fragment):
    plan = tmp_path / "plan.json"
    plan.write_bytes(plan_bytes)
    out = tmp_path / "out"
    rc = generate(out, "--plan", plan)
    assert_one_line(rc, capsys, "plan", fragment)
    assert_nothing_written(out)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_real_tile_is_one_line(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    rc = main(["generate", "--out", str(tmp_path / "out"), *CHEAP, "--normal-source", "real", "--real-tiles", str(real)])
    assert_one_line(rc, capsys, "bomb.png")
    assert_nothing_written(tmp_path / "out")


def test_a_16_bit_real_tile_keeps_its_grey_levels(tmp_path):
    grey = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    decoded = storage.decode_image(buf.getvalue())
    assert decoded.shape == (256, 256, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[:, :, 0], (grey >> 8).astype(np.uint8))  # not all 255
    assert decoded.min() == 0 and decoded.max() == 255


def test_a_truncated_shard_as_real_tiles_is_one_line(tmp_path, capsys):
    shard = tmp_path / "real.tar"
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # incompressible
    ann = {"tile_index": 0, "width": 256, "height": 256}
    w = storage.ShardWriter(str(tmp_path / "src"), 0)
    w.add(0, image, {**ann, "seed": 0, "boxes": [], "labels": [], "normal_boxes": [], "source": "real"})
    w.commit()
    data = (tmp_path / "src" / "shards" / "000000.tar").read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rc = main(["generate", "--out", str(tmp_path / "out"), *CHEAP, "--normal-source", "real", "--real-tiles", str(shard)])
    assert_one_line(rc, capsys, "real.tar")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("junk", [("notes.txt", b"mine"), ("stats/000000.json", b"junk")], ids=["own-file", "junk-marker"])
def test_a_foreign_non_empty_out_is_refused_before_anything_is_written(tmp_path, capsys, junk):
    out = tmp_path / "out"
    (out / junk[0]).parent.mkdir(parents=True, exist_ok=True)
    (out / junk[0]).write_bytes(junk[1])
    rc = generate(out)
    assert_one_line(rc, capsys, "not a cytosynth output")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [junk[0]]


def test_a_corrupt_job_json_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_bytes(b'{"config": ')
    rc = generate(out)
    assert_one_line(rc, capsys, "job.json")


def test_shard_stats_without_tiles_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(out, "--tiles-per-shard", "1") == 0
    (out / "_SUCCESS").unlink()
    stats = Path(storage.stats_url(str(out), 0))
    record = json.loads(stats.read_text())
    del record["tiles"]
    stats.write_text(json.dumps(record))
    capsys.readouterr()
    rc = generate(out, "--tiles-per-shard", "1")
    assert_one_line(rc, capsys, "000000.json", "tiles")


def test_preview_with_a_negative_max_tiles_is_one_line(tmp_path, capsys):
    rc = main(["preview", str(tmp_path), "--max-tiles", "-1"])
    assert_one_line(rc, capsys, "--max-tiles")


@pytest.mark.parametrize("option", ["--lora", "--acs-unet"])
def test_a_model_part_without_a_bundle_is_refused_not_ignored(tmp_path, capsys, option):
    rc = generate(tmp_path / "out", option, tmp_path / "part")
    assert_one_line(rc, capsys, option, "give --model-dir")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [("acs_unet/", "missing the Abnormal Cell Synthesizer folder {url}/acs_unet"),
     ("vae/config.json", "cannot load vae from {url}: ")],
)
def test_an_error_about_a_remote_bundle_names_its_url_not_the_local_copy(s3_bucket, tmp_path, capsys, broken, fragment):
    import s3fs

    from cytosynth.synth.abnormal import ACS_INPUT_LAYOUT, ACS_LAYOUT_KEY

    url = s3_bucket + "/bundle"
    fs = s3fs.S3FileSystem()
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        fs.pipe(f"{url}/{part}/config.json", b"{}")
    acs = {"in_channels": 9, "attention_type": "gated", ACS_LAYOUT_KEY: ACS_INPUT_LAYOUT}
    fs.pipe(f"{url}/acs_unet/config.json", json.dumps(acs).encode())
    if broken.endswith("/"):
        fs.rm(f"{url}/{broken}", recursive=True)
    else:
        fs.pipe(f"{url}/{broken}", b"{not json")
    rc = main(["generate", "--out", str(tmp_path / "out"), "--preset", "sd15", "--model-dir", url, "--num-tiles", "1",
               "--tile-size", "256", "--device", "cpu", "--quiet"])
    err = assert_one_line(rc, capsys, fragment.format(url=url))
    assert "cytosynth-model-" not in err and "/tmp" not in err, err


def test_a_bad_remote_detector_file_is_named_by_its_url(s3_bucket, tmp_path, capsys):
    import s3fs

    url = s3_bucket + "/det/detector.safetensors"
    s3fs.S3FileSystem().pipe(url, b"not a safetensors file")
    rc = generate(tmp_path / "out", "--detector", url)
    err = assert_one_line(rc, capsys, f"detector weights {url} are not a readable safetensors file")
    assert "cytosynth-model-" not in err and "/tmp" not in err, err
