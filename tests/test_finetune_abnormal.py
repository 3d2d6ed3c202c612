"""`cytosynth finetune-abnormal`: the Abnormal Cell Synthesizer trained on the harness (2 Ray Train
workers, DeepSpeed ZeRO-2 on CPU over gloo), streaming abnormal-cell shards from S3 (moto), and the
UNet folder it writes loaded back by `cytosynth generate --acs-unet`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from training_helpers import changed_parameters, moto_bucket, read_metrics, start_ray, write_phantom_shards

from cytosynth import storage
from cytosynth.training.abnormal_cells import AbnormalCellTask
from cytosynth.jobs import cli
from cytosynth.synth import random_bundle, save_bundle
from cytosynth.synth.acs_training import is_acs_trainable
from cytosynth.synth.ldm_training import load_sd_components

pytestmark = pytest.mark.timeout(900)

STEPS = 24


@pytest.fixture(scope="module")
def s3_data(s3_server, tmp_path_factory):
    """Abnormal-cell shards (4 phantom tiles of 320 px, 2 shards, one LSIL box each) in a fresh moto
    bucket, with the AWS environment pointing at it for the whole module (Ray workers inherit it)."""
    with moto_bucket(s3_server, "acs-data") as bucket:
        yield write_phantom_shards(f"{bucket}/cells", tiles=4, per_shard=2, size=320, abnormal=True)


@pytest.fixture(scope="module")  # minutes on a loaded 2-core machine: the tests using it are marked slow
def trained(s3_data, tmp_path_factory):
    """One run for the module: 24 steps, 2 workers x batch 2, lr 2e-3 (a short overfit), data on S3.
    Returns (out, exit code, stdout)."""
    import ray

    out = str(tmp_path_factory.mktemp("acs") / "out")
    start_ray()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = cli.main([
                "finetune-abnormal", "--data", s3_data, "--out", out, "--steps", str(STEPS), "--batch-size", "2",
                "--workers", "2", "--device", "cpu", "--lr", "2e-3", "--sample-every", str(STEPS),
                "--checkpoint-every", "100", "--log-every", "1", "--sample-steps", "2", "--quiet",
            ])
    finally:
        ray.shutdown()
    return out, code, stdout.getvalue()


def initial_acs_state() -> dict[str, torch.Tensor]:
    """The ACS before training, exactly as the job builds it (same base, same seeded new layers)."""
    model, _ = AbnormalCellTask().build(torch.device("cpu"))
    return model.unet.state_dict()


@pytest.mark.slow
def test_the_run_writes_a_diffusers_acs_unet_folder_with_its_records(trained):
    out, code, stdout = trained
    assert code == 0
    acs = UNet2DConditionModel.from_pretrained(os.path.join(out, "acs_unet"), use_safetensors=True)
    assert acs.config.in_channels == 9 and acs.config.attention_type == "gated"
    assert os.path.exists(os.path.join(out, "acs_unet", "diffusion_pytorch_model.safetensors"))
    summary = json.loads(open(os.path.join(out, "_SUCCESS")).read())
    assert summary["job"] == "finetune-abnormal" and summary["steps"] == STEPS and summary["workers"] == 2
    job = json.loads(open(os.path.join(out, "job.json")).read())
    config = job["config"]
    assert config["data"] == "s3://acs-data/cells" and config["lr"] == 2e-3 and config["optimizer"] == "adamw"
    assert config["prompt_dropout"] == 0.5 and config["grounding_dropout"] == 0.1  # CFG training, named as such
    assert (config["batch_size"], config["workers"], config["global_batch_size"]) == (2, 2, 4)
    assert "crops      ASC-US 0, ASC-H 0, LSIL 4, HSIL 0" in stdout
    grid = Image.open(os.path.join(out, "samples", f"step_{STEPS:06d}.png"))
    assert grid.size == (5 * 256 + 6 * 4, 4 * 256 + 5 * 4)  # 4 crops x (crop + the four classes)


@pytest.mark.slow
def test_loss_is_finite_and_falls_over_a_short_overfit_run(trained):
    out, *_ = trained
    losses = [row["loss"] for row in read_metrics(out)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6])


@pytest.mark.slow
def test_only_gated_attention_position_net_and_input_conv_weight_changed(trained):
    out, *_ = trained
    before = initial_acs_state()
    after = UNet2DConditionModel.from_pretrained(os.path.join(out, "acs_unet"), use_safetensors=True).state_dict()
    before = {name: tensor.reshape(after[name].shape) for name, tensor in before.items()}  # gates: (1,) in training
    changed = changed_parameters(before, after)
    assert changed and all(is_acs_trainable(name) for name in changed), [n for n in changed if not is_acs_trainable(n)]
    assert "conv_in.weight" in changed and "conv_in.bias" not in changed
    assert any(name.startswith("position_net.") for name in changed)
    assert any(name.endswith(".fuser.alpha_attn") for name in changed)
    assert torch.count_nonzero(after["conv_in.weight"][:, 4:]) > 0  # it learned to read mask + background
    # Everything frozen is the base SD UNet's own weights, bit for bit.
    base = load_sd_components(None, "tiny").unet.state_dict()
    for name, tensor in base.items():
        if name != "conv_in.weight":
            assert torch.equal(after[name], tensor), name


def generated_tile(out: str) -> tuple[np.ndarray, dict]:
    (sample,) = storage.read_samples(out)
    return sample["image"], sample["json"]


@pytest.mark.slow
def test_generate_loads_the_trained_acs_and_its_edits_change(trained, tmp_path):
    out, *_ = trained
    bundle = str(save_bundle(random_bundle("tiny"), tmp_path / "bundle"))
    untrained = AbnormalCellTask()
    untrained.save(untrained.build(torch.device("cpu"))[0], str(tmp_path / "untrained"))
    tiles = {}
    for name, acs in (("trained", os.path.join(out, "acs_unet")), ("untrained", str(tmp_path / "untrained" / "acs_unet"))):
        code = cli.main([
            "generate", "--model-dir", bundle, "--acs-unet", acs, "--preset", "tiny", "--normal-source", "phantom",
            "--num-tiles", "1", "--tile-size", "384", "--cells", "1-1", "--steps", "2", "--out", str(tmp_path / "generated" / name),
            "--device", "cpu", "--quiet",
        ])
        assert code == 0
        tiles[name] = generated_tile(str(tmp_path / "generated" / name))
    (image, annotation), (untrained_image, untrained_annotation) = tiles["trained"], tiles["untrained"]
    assert annotation["boxes"] == untrained_annotation["boxes"] and annotation["models"]["acs_unet"] != untrained_annotation["models"]["acs_unet"]
    x0, y0, x1, y1 = annotation["boxes"][0]
    assert not np.array_equal(image[y0:y1, x0:x1], untrained_image[y0:y1, x0:x1])


def test_coco_json_and_shards_of_the_same_tiles_give_the_same_crops(tmp_path):
    shards = write_phantom_shards(str(tmp_path / "shards"), tiles=3, per_shard=3, size=320, abnormal=True)
    images, annotations = [], []
    for sample in storage.read_samples(shards):
        name = f"{sample['key']}.png"
        (tmp_path / "coco").mkdir(exist_ok=True)
        (tmp_path / "coco" / name).write_bytes(storage.encode_image(sample["image"]))
        images.append({"id": sample["tile_index"], "file_name": name, "width": 320, "height": 320})
        for x0, y0, x1, y1 in sample["json"]["boxes"]:
            annotations.append({"id": len(annotations) + 1, "image_id": sample["tile_index"], "category_id": 3,
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    coco = tmp_path / "coco" / "cells.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations, "categories": storage.CATEGORIES}))

    def first_epoch(task: AbnormalCellTask) -> list:
        task.validate()
        batches = task.batches(rank=0, world_size=1, batch_size=1, seed=3)  # buffer 1: epoch order, unmixed
        return sorted((b.boxes.tolist(), b.labels, b.images.tobytes()) for b in (next(batches) for _ in range(3)))

    from_shards = first_epoch(AbnormalCellTask(data=shards, shuffle_buffer=1))
    assert len(from_shards) == 3
    assert from_shards == first_epoch(AbnormalCellTask(coco=str(coco), shuffle_buffer=1))


# --------------------------------------------------------------------------- bad input


def coco_set(folder, stated_size=(320, 320), image_size=(320, 320), box=(40, 40, 100, 100)) -> str:
    """One image with one HSIL box; the JSON states `stated_size`, the PNG is `image_size`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "t.png").write_bytes(storage.encode_image(np.zeros((image_size[1], image_size[0], 3), np.uint8)))
    x0, y0, x1, y1 = box
    coco = {"images": [{"id": 1, "file_name": "t.png", "width": stated_size[0], "height": stated_size[1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [x0, y0, x1 - x0, y1 - y0]}],
            "categories": storage.CATEGORIES}
    (folder / "cells.json").write_text(json.dumps(coco))
    return str(folder / "cells.json")


def coco_text(folder, text: str) -> str:
    path = coco_set(folder)
    with open(path, "w") as fh:
        fh.write(text)
    return path


BAD_INPUTS = {
    "shards without abnormal boxes": (
        lambda p: ["--data", write_phantom_shards(str(p / "normal"), tiles=2, per_shard=2, size=320)],
        "no abnormal cell boxes"),
    "tiles smaller than the crop": (
        lambda p: ["--data", write_phantom_shards(str(p / "small"), tiles=2, per_shard=2, size=128, abnormal=True)],
        "smaller than the 256x256 crop"),
    "boxes too large for a crop": (
        lambda p: ["--coco", coco_set(p / "c", (512, 512), (512, 512), box=(0, 0, 300, 300))],
        "no abnormal cell boxes"),
    "empty COCO file": (lambda p: ["--coco", coco_text(p / "c", "")], "is not a COCO detection file"),
    "COCO without annotations": (
        lambda p: ["--coco", coco_text(p / "c", '{"images": [], "categories": []}')], "no 'annotations' list"),
    "missing image": (lambda p: ["--coco", coco_set(p / "c"), "--images", str(p / "elsewhere")], "elsewhere/t.png"),
    "wrong image size": (
        lambda p: ["--coco", coco_set(p / "c", image_size=(300, 320))], "t.png is 300x320 but .* says 320x320"),
    "image folder without COCO": (lambda p: ["--data", str(p), "--images", str(p)], "--images is the image folder of --coco"),
    "model folder without its parts": (
        lambda p: ["--coco", coco_set(p / "c"), "--model-dir", str(p)], "missing the .*/ folder of a diffusers SD1.5 model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = cli.main(["finetune-abnormal", *make_args(tmp_path), "--out", str(out), "--workers", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # no job.json, no checkpoint, no acs_unet, no _SUCCESS
