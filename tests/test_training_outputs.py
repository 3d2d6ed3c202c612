"""What a training job leaves in --out: it belongs to one job (another task's checkpoints are never
resumed), and each task's artifact is the model it was handed, trained parameters and all (the
harness hands it the model after the last step: test_training_harness)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from training_helpers import write_phantom_shards

from cytosynth import storage
from cytosynth.training.abnormal_cells import AbnormalCellTask
from cytosynth.training.normal_lora import NormalLoraTask
from cytosynth.training.detector_task import DetectorTask
from cytosynth.training.checkpoints import COMPLETE_MARKER, checkpoint_url
from cytosynth.jobs import cli
from cytosynth.synth.detector import load_detector_model
from cytosynth.synth.models import merge_lora, load_normal_lora
from cytosynth.synth.ldm_training import load_sd_components

TILE = 64
LORA_TARGET = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q.weight"


@pytest.mark.parametrize("other", ["finetune-abnormal", "train-detector"])
def test_a_checkpoint_of_another_task_is_refused_in_one_line_with_nothing_written(tmp_path, capsys, other):
    data = write_phantom_shards(str(tmp_path / "tiles"), tiles=2, per_shard=2, size=TILE)
    out = str(tmp_path / "out")
    storage.write_job_json(out, {"job": other, "batch_size": 1, "seed": 0})
    os.makedirs(checkpoint_url(out, 2))
    with open(os.path.join(checkpoint_url(out, 2), COMPLETE_MARKER), "w") as fh:
        fh.write("{}")
    before = sorted(os.listdir(out)), open(os.path.join(out, "job.json")).read()

    code = cli.main(["finetune-normal", "--data", data, "--out", out, "--tile-size", str(TILE), "--steps", "4",
                     "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "different job config" in err and "job" in err.split("differs in:")[1]
    assert (sorted(os.listdir(out)), open(os.path.join(out, "job.json")).read()) == before
    assert json.loads(before[1])["config"]["job"] == other


def as_if_trained(trainable: list[torch.nn.Parameter]) -> None:
    """Move every trainable parameter well away from its init (seeded), as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=generator) + 0.01)


@pytest.mark.slow  # a from-scratch Faster R-CNN saved and read back: about 15 s
def test_the_detector_file_holds_the_model_it_was_given(tmp_path):
    task = DetectorTask("unused", labels="nilm", image_size=TILE)
    model, trainable = task.build(torch.device("cpu"))
    as_if_trained(trainable)
    url = task.save(model, str(tmp_path))
    saved = load_detector_model(url).state_dict()
    given = model.state_dict()
    assert saved.keys() == given.keys()
    assert all(torch.equal(saved[k], given[k]) for k in given)


@pytest.mark.slow  # measured 7-36 s on a loaded 2-core machine
def test_the_lora_file_merges_into_the_base_as_the_trained_lora_does(tmp_path):
    task = NormalLoraTask("unused", tile_size=TILE)
    model, trainable = task.build(torch.device("cpu"))
    as_if_trained(trainable)
    url = task.save(model, str(tmp_path))
    merge_lora(model.unet)  # the trained model as generate would run it
    loaded = load_sd_components(None, "tiny").unet
    load_normal_lora(loaded, url)
    given, saved = model.unet.state_dict(), loaded.state_dict()
    assert saved.keys() == given.keys()
    for name in given:
        torch.testing.assert_close(saved[name], given[name], rtol=1e-5, atol=1e-6, msg=name)
    base = load_sd_components(None, "tiny").unet.state_dict()
    assert not torch.equal(saved[LORA_TARGET], base[LORA_TARGET])  # the LoRA moved the weights


def test_the_acs_unet_folder_holds_the_trained_parameters_it_was_given(tmp_path):
    task = AbnormalCellTask()
    model, trainable = task.build(torch.device("cpu"))
    as_if_trained(trainable)
    url = task.save(model, str(tmp_path))
    saved = UNet2DConditionModel.from_pretrained(url, use_safetensors=True).state_dict()
    trained = {name: p for name, p in model.unet.named_parameters() if p.requires_grad}
    assert trained and len(trained) == len(trainable)
    for name, p in trained.items():
        assert torch.equal(saved[name], p.detach().reshape(saved[name].shape)), name
