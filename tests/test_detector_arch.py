"""train-detector as the paper's Table II trains detectors: `--backbone-weights` (an ImageNet
ResNet-50 as safetensors: frozen BatchNorm, torchvision's 3 trainable stages), `--arch retinanet`,
the 20-epoch preset and per-arch learning rates; detector files that say their architecture, so
eval-detector and generate load both. The ResNet-50 weights are random ones made here: nothing is
downloaded."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os

import fsspec
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops.misc import FrozenBatchNorm2d
from training_helpers import start_ray, write_phantom_shards

from cytosynth import storage
from cytosynth.cluster import ray_train
from cytosynth.training.detector_task import DetectorTask
from cytosynth.training.loop import start_job
from cytosynth.jobs import cli
from cytosynth.synth.detector import build_fasterrcnn, load_detector, save_detector
from cytosynth.synth.detection_metrics import load_detection_model, object_classes
from cytosynth.synth.models import DETECTOR_FILE

TILE = 128
TRAINING = ("--image-size", str(TILE), "--batch-size", "2", "--device", "cpu", "--loader-workers", "0", "--quiet")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> dict[str, object]:
    """A torchvision ResNet-50 state dict (random, seeded; BatchNorm statistics made non-trivial so a
    load is visible) as a safetensors file and as a memory:// object, and its sha256 prefix."""
    torch.manual_seed(3)
    state = resnet50(weights=None).state_dict()
    for key, value in state.items():  # small means: activations must survive the ReLUs for gradients
        if key.endswith("running_mean"):
            value.uniform_(-0.1, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    data = save(state)
    path = str(tmp_path_factory.mktemp("backbone") / "resnet50.safetensors")
    with open(path, "wb") as fh:
        fh.write(data)
    url = "memory://backbones/resnet50.safetensors"
    with fsspec.open(url, "wb") as fh:
        fh.write(data)
    return {"state": state, "path": path, "url": url, "sha256": hashlib.sha256(data).hexdigest()[:16]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("nilm") / "nilm"), tiles=4, per_shard=2, size=TILE)


def body(model: torch.nn.Module) -> torch.nn.Module:
    return model.backbone.body


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("arch, kind", [("fasterrcnn", FasterRCNN), ("retinanet", RetinaNet)])
def test_backbone_weights_land_in_the_body_with_frozen_batchnorm_and_three_trainable_stages(backbone, arch, kind):
    task = DetectorTask("unused", labels="nilm", image_size=TILE, arch=arch, backbone_weights=backbone["url"],
                        backbone_sha256=backbone["sha256"])
    model, trainable = task.build(torch.device("cpu"))
    state = backbone["state"]
    assert isinstance(model, kind)
    assert torch.equal(body(model).layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(body(model).bn1.running_var, state["bn1.running_var"])
    assert torch.equal(body(model).layer2[0].bn1.running_mean, state["layer2.0.bn1.running_mean"])
    norms = [m for m in body(model).modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    # torchvision's trainable_backbone_layers=3: layer2-4 train, conv1 and layer1 stay as loaded.
    grads = {name.split(".")[0]: p.requires_grad for name, p in body(model).named_parameters()}
    assert grads == {"conv1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["fasterrcnn", "retinanet"])
def test_without_backbone_weights_it_trains_from_scratch_with_batchnorm(arch):
    model, trainable = DetectorTask("unused", labels="nilm", image_size=TILE, arch=arch).build(torch.device("cpu"))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body(model).modules())
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()}


def test_a_retinanet_trains_a_step_and_its_file_loads_for_eval_and_generate(backbone, shards, tmp_path, capsys):
    task = DetectorTask(shards, labels="nilm", image_size=TILE, loader_workers=0, arch="retinanet",
                        backbone_weights=backbone["path"])
    model, trainable = task.build(torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    loss = task.loss(model, next(task.batches(0, 1, 2, seed=0)))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert torch.isfinite(loss)
    assert not torch.equal(before["backbone.body.layer4.0.conv1.weight"], after["backbone.body.layer4.0.conv1.weight"])
    assert torch.equal(before["backbone.body.layer1.0.conv1.weight"], after["backbone.body.layer1.0.conv1.weight"])

    path = task.save(model, str(tmp_path))
    with safe_open(path, framework="pt") as weights:
        assert weights.metadata() == {"arch": "retinanet", "norm": "frozen"}
    loaded = load_detection_model(path, min_size=TILE, max_size=TILE)
    assert isinstance(loaded, RetinaNet) and object_classes(loaded) == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in after.items())
    assert cli.main(["eval-detector", "--detector", path, "--data", shards, "--labels", "nilm",
                     "--image-size", str(TILE), "--device", "cpu", "--quiet"]) == 0
    assert "nilm" in capsys.readouterr().out
    # generate's cell detector takes the same file: boxes come back in the usual form.
    found = load_detector(path, min_size=TILE, max_size=TILE).detect([np.full((TILE, TILE, 3), 200, np.uint8)])
    assert found[0].dtype == np.int64 and found[0].shape[1] == 4


def test_a_file_without_metadata_loads_as_the_batchnorm_faster_rcnn_it_was(tmp_path):
    path = str(tmp_path / "old.safetensors")
    save_file(build_fasterrcnn(5).state_dict(), path)  # as save_detector wrote files before the metadata
    model = load_detection_model(path)
    assert isinstance(model, FasterRCNN) and object_classes(model) == 4
    save_detector(model, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as weights:
        assert weights.metadata() == {"arch": "fasterrcnn", "norm": "batch"}


# --------------------------------------------------------------------------- options


@pytest.fixture
def captured(monkeypatch) -> list:
    """train-detector up to the ranks: the (TrainConfig, task) the harness would train, settled
    and checked by its driver part (`training.loop.start_job`), no Ray."""
    calls = []

    def fake_train(config, task):
        config, _ = start_job(config, task)
        calls.append((config, task))
        return {"job": task.name, "steps": config.steps, "workers": config.workers, "final_loss": 0.0,
                "artifact": "-", "out": config.out}

    monkeypatch.setattr(ray_train, "train", fake_train)
    return calls


@pytest.mark.parametrize("arch, lr", [("fasterrcnn", 2e-4), ("retinanet", 1e-3)])
def test_the_paper_preset_is_20_epochs_with_each_detectors_own_lr(captured, shards, tmp_path, arch, lr):
    assert cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--arch", arch,
                     "--out", str(tmp_path / "out"), *TRAINING]) == 0
    config, task = captured[0]
    assert config.optimizer == "sgd" and config.lr == lr and task.arch == arch
    assert config.steps == math.ceil(20 * 4 / 2)  # 20 epochs of 4 tiles at batch 2 on 1 worker


def test_steps_and_lr_override_the_preset(captured, shards, tmp_path):
    assert cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--arch", "retinanet", "--steps", "7",
                     "--lr", "0.05", "--out", str(tmp_path / "out"), *TRAINING]) == 0
    config, _ = captured[0]
    assert config.steps == 7 and config.lr == 0.05


def test_roi_samples_set_the_proposals_the_box_head_trains_on_and_are_recorded(captured, shards, tmp_path):
    assert cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--roi-samples", "128", "--steps", "1",
                     "--out", str(tmp_path / "out"), *TRAINING]) == 0
    _, task = captured[0]
    model, _ = task.build(torch.device("cpu"))
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert task.record()["roi_samples"] == 128
    assert DetectorTask(real=shards).build(torch.device("cpu"))[0].roi_heads.fg_bg_sampler.batch_size_per_image == 512


def test_the_record_names_the_backbone_by_fingerprint_not_by_url(captured, backbone, shards, tmp_path):
    assert cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--backbone-weights", backbone["url"],
                     "--steps", "1", "--out", str(tmp_path / "out"), *TRAINING]) == 0
    _, task = captured[0]
    record = task.record()
    assert record["backbone_sha256"] == backbone["sha256"] and record["arch"] == "fasterrcnn"
    assert "resnet50" not in json.dumps(record)


def test_resuming_with_another_arch_or_backbone_is_refused(backbone, shards, tmp_path, monkeypatch, capsys):
    """job.json records arch and backbone: a re-run into the same --out with either changed is
    another model's run, refused before any training (the rank is stopped right after job.json)."""
    from cytosynth.training import loop

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt  # cli: "interrupted", exit 130, after job.json was written

    monkeypatch.setattr(loop, "train_rank", stopped)
    out = str(tmp_path / "out")
    common = ["train-detector", "--real", shards, "--labels", "nilm", "--steps", "1", "--out", out, *TRAINING]
    assert cli.main([*common, "--backbone-weights", backbone["path"]]) == 130
    capsys.readouterr()
    for change in (["--arch", "retinanet", "--backbone-weights", backbone["path"]], []):
        assert cli.main([*common, *change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "different job config" in err, err
        assert ("arch" if change else "backbone_sha256") in err, err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    files = {"resnet18": str(root / "resnet18.safetensors"), "random": str(root / "random.safetensors"),
             "pickle": str(root / "resnet50.pth")}
    save_file(resnet18(weights=None).state_dict(), files["resnet18"])
    save_file({"weight": torch.randn(8, 8)}, files["random"])
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, files["pickle"])
    return files


@pytest.mark.parametrize(
    "options, message",
    [
        ({"--backbone-weights": "resnet18"}, "not a torchvision ResNet-50 state dict (expected keys like conv1.weight"),
        ({"--backbone-weights": "random"}, "not a torchvision ResNet-50 state dict (expected keys like conv1.weight"),
        ({"--backbone-weights": "pickle"}, "are not a readable safetensors file"),
        ({"--backbone-weights": "missing"}, "--backbone-weights: cannot read"),
        ({"--arch": "dino"}, "unknown --arch 'dino'; choose one of fasterrcnn, retinanet (DINO is not in torchvision)"),
        ({"--epochs": "2", "--steps": "3"}, "give --steps or --epochs, not both"),
        ({"--roi-samples": "0"}, "--roi-samples must be at least 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(bad_files, shards, options, message, tmp_path, capsys):
    files = {**bad_files, "missing": str(tmp_path / "nowhere.safetensors")}
    options = {k: files.get(v, v) if k == "--backbone-weights" else v for k, v in options.items()}
    out = tmp_path / "out"
    settings = {"--real": shards, "--labels": "nilm", "--out": str(out), **options}
    code = cli.main(["train-detector", *TRAINING, *(x for item in settings.items() for x in item)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists() or not any(out.iterdir())  # at most the empty folder of the writability probe


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_detector_trains_a_retinanet_on_the_backbone_that_eval_detector_scores(backbone, shards, tmp_path,
                                                                                     capsys):
    import ray

    out = str(tmp_path / "out")
    start_ray()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--arch", "retinanet",
                             "--backbone-weights", backbone["path"], "--steps", "2", "--workers", "1",
                             "--checkpoint-every", "100", "--sample-every", "100", "--out", out, *TRAINING])
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    record = json.loads(open(os.path.join(out, "job.json")).read())
    assert record["config"]["arch"] == "retinanet" and record["config"]["lr"] == 1e-3
    assert record["config"]["backbone_sha256"] == backbone["sha256"]
    assert backbone["path"] not in json.dumps(record)
    detector = os.path.join(out, DETECTOR_FILE)
    model = load_detection_model(detector)
    assert isinstance(model, RetinaNet)
    assert torch.equal(body(model).layer1[0].conv1.weight, backbone["state"]["layer1.0.conv1.weight"])  # frozen
    assert cli.main(["eval-detector", "--detector", detector, "--data", shards, "--labels", "nilm",
                     "--image-size", str(TILE), "--device", "cpu", "--quiet"]) == 0
    assert storage.is_complete(out)
