"""`cytosynth train-detector`: Faster R-CNN trained on the harness (2 Ray Train workers, DeepSpeed
ZeRO-2 on CPU over gloo) from NILM-labelled phantom shards streamed from S3 (moto), and the
safetensors file it writes used by `cytosynth generate --detector`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import moto_bucket, read_metrics, start_ray, write_phantom_shards

from cytosynth import storage
from cytosynth.jobs import cli
from cytosynth.training.detector_task import DetectorTask
from cytosynth.training.loop import run_seed
from cytosynth.synth.detector import FasterRCNNCellDetector, build_fasterrcnn, load_detector
from cytosynth.synth.models import DETECTOR_FILE, fingerprint

pytestmark = pytest.mark.timeout(900)

STEPS, TILE = 12, 128
TRAINING = ("--image-size", str(TILE), "--batch-size", "2", "--device", "cpu", "--loader-workers", "0", "--quiet")


@pytest.fixture(scope="module")
def s3_data(s3_server):
    """4 phantom tiles (2 shards) whose every drawn cell is a NILM box, in a fresh moto bucket; the
    AWS environment points at it for the whole module (Ray workers inherit it)."""
    with moto_bucket(s3_server, "detector-data") as bucket:
        yield write_phantom_shards(f"{bucket}/nilm", tiles=4, per_shard=2, size=TILE)


@pytest.fixture(scope="module")  # minutes on a loaded 2-core machine: the tests using it are marked slow
def trained(s3_data, tmp_path_factory):
    """One run for the module: a short overfit (12 steps, 2 workers x batch 2, Adam 1e-4). Returns
    (out, exit code, stdout)."""
    import ray

    out = str(tmp_path_factory.mktemp("detector") / "out")
    start_ray()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            code = cli.main(["train-detector", "--real", s3_data, "--labels", "nilm", "--out", out, "--workers", "2",
                             "--steps", str(STEPS), "--optimizer", "adam", "--lr", "1e-4", "--weight-decay", "0",
                             "--log-every", "1", "--sample-every", str(STEPS), "--checkpoint-every", "100", *TRAINING])
    finally:
        ray.shutdown()
    return out, code, stdout.getvalue()


@pytest.mark.slow
def test_the_run_writes_a_detector_file_with_its_records(trained):
    out, code, stdout = trained
    assert code == 0, stdout
    assert {DETECTOR_FILE, "job.json", "metrics.jsonl", "_SUCCESS", "samples"} <= set(os.listdir(out))
    job = json.loads(open(os.path.join(out, "job.json")).read())["config"]
    assert job["job"] == "train-detector" and job["labels"] == "nilm" and job["real"] == "s3://detector-data/nilm"
    assert os.listdir(os.path.join(out, "samples")) == [f"step_{STEPS:06d}.png"]
    assert f"train-detector finished {STEPS} steps on 2 workers" in stdout


@pytest.mark.slow
def test_loss_is_finite_and_falls_over_a_short_overfit_run(trained):
    losses = [row["loss"] for row in read_metrics(trained[0])]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])  # measured: 2.73 -> 1.97


@pytest.mark.slow
def test_the_file_is_the_two_class_faster_rcnn_the_generator_loads(trained):
    state = load_file(os.path.join(trained[0], DETECTOR_FILE))
    reference = build_fasterrcnn(2).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert isinstance(load_detector(os.path.join(trained[0], DETECTOR_FILE)), FasterRCNNCellDetector)


def seeded_init() -> torch.nn.Module:
    """The detector the run started from: rank 0's build under the first run's seed."""
    torch.manual_seed(run_seed(0, 0))
    model, _ = DetectorTask("unused", labels="nilm", image_size=TILE).build(torch.device("cpu"))
    return model


@pytest.mark.slow
def test_the_file_is_the_trained_model_a_few_adam_steps_from_the_seeded_init(trained):
    saved = load_file(os.path.join(trained[0], DETECTOR_FILE))
    init = {name: p.detach() for name, p in seeded_init().named_parameters()}
    moved = {name: (saved[name] - p).abs().max().item() for name, p in init.items()}
    # Adam moves a weight by about lr per step: 12 steps at 1e-4 stay within 12 * 3e-4 of the
    # init; another random init is ~1e-2 away. Every parameter trains, so every one moved.
    assert max(moved.values()) < STEPS * 3e-4, max(moved, key=moved.get)
    unmoved = [name for name, d in moved.items() if d == 0]
    assert not unmoved, unmoved[:5]


@pytest.mark.slow
def test_the_file_fits_its_training_tiles_better_than_the_init(trained, s3_data):
    """The detection loss on the 4 training tiles, the same proposal sampling for both models."""
    samples = list(storage.shard_detection_samples(s3_data, "nilm"))
    task = DetectorTask(s3_data, labels="nilm", image_size=TILE)

    def mean_loss(model: torch.nn.Module) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return task.loss(model.train(), ([i for i, _ in samples], [t for _, t in samples])).item()

    before = mean_loss(seeded_init())
    trained_model = seeded_init()
    trained_model.load_state_dict(load_file(os.path.join(trained[0], DETECTOR_FILE)))
    assert mean_loss(trained_model) < 0.9 * before


def test_from_scratch_every_parameter_is_trained():
    model, trainable = DetectorTask("unused", labels="nilm", image_size=TILE).build(torch.device("cpu"))
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()}


@pytest.mark.slow
def test_generate_finds_its_normal_cells_with_the_trained_detector(trained, tmp_path):
    def normal_boxes(*extra: str) -> tuple[list, str]:
        """Every tile's cells (normal and edited boxes) and the output folder."""
        out = str(tmp_path / f"gen{len(extra)}")
        assert cli.main(["generate", "--normal-source", "phantom", "--num-tiles", "2", "--tile-size", "256",
                         "--steps", "2", "--device", "cpu", "--quiet", "--out", out, *extra]) == 0
        return [s["json"]["normal_boxes"] + s["json"]["boxes"] for s in storage.read_samples(out)], out

    classical, _ = normal_boxes()
    with_detector, out = normal_boxes("--detector", os.path.join(trained[0], DETECTOR_FILE))
    assert with_detector != classical
    detector = os.path.join(trained[0], DETECTOR_FILE)
    assert json.loads(open(os.path.join(out, "job.json")).read())["config"]["models"]["detector"] == fingerprint(detector)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"--real": "nowhere"}, "no committed shards found at"),
        ({"--labels": "abnormal"}, "holds no abnormal boxes to train on"),
        ({"--synthetic-fraction": "0.5"}, "--synthetic-fraction 0.5 needs --synthetic shards"),
        ({"--image-size": "16"}, "--image-size must be at least 32, got 16"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(options, message, tmp_path, capsys):
    shards = write_phantom_shards(str(tmp_path / "nilm"), tiles=2, per_shard=2, size=64)
    out = tmp_path / "out"
    settings = {"--real": shards, "--labels": "nilm", "--out": str(out), "--steps": "1", **options}
    code = cli.main(["train-detector", *TRAINING, *(x for item in settings.items() for x in item)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists() or not any(out.iterdir())  # at most the empty folder of the writability probe


@pytest.mark.parametrize("synthetic_side, warned", [(128, True), (64, False)])
def test_real_and_synthetic_tiles_of_different_sides_are_warned_of_before_training(synthetic_side, warned,
                                                                                    tmp_path, capsys):
    # Both are resized to --image-size: 64 px real tiles beside 128 px synthetic ones put a cell of
    # the same magnification in front of the detector at twice the size (the miniature's Table II
    # first mixed 512 px real tiles with 1024 px edits so).
    real = write_phantom_shards(str(tmp_path / "real"), tiles=2, per_shard=2, size=64, abnormal=True)
    synthetic = write_phantom_shards(str(tmp_path / "synthetic"), tiles=2, per_shard=2, size=synthetic_side,
                                     abnormal=True)
    DetectorTask(real=real, synthetic=synthetic, synthetic_fraction=0.5, image_size=64).validate()
    err = capsys.readouterr().err.strip()
    if warned:
        assert err == ("warning: --real tiles are 64x64 and --synthetic tiles 128x128; both are resized to "
                       "--image-size 64, so a real cell reaches the detector 2x the size of a synthetic cell "
                       "of the same magnification"), err
    else:
        assert err == ""


@pytest.mark.slow
def test_a_failure_inside_a_training_worker_is_one_line_naming_its_real_cause(tmp_path, capsys):
    # --lr 1e30 passes every up-front check; the loss turns non-finite on the ranks' second step.
    # Ray Train's own message for it is "Training failed due to worker errors: [Rank 0 Error Snippet]:"
    # (2 workers: one rank trains in-process, without Ray).
    shards = write_phantom_shards(str(tmp_path / "nilm"), tiles=4, per_shard=2, size=64)
    code = cli.main(["train-detector", "--real", shards, "--labels", "nilm", "--out", str(tmp_path / "out"),
                     "--workers", "2", "--steps", "3", "--lr", "1e30", "--image-size", "64", "--batch-size", "2",
                     "--device", "cpu", "--loader-workers", "0", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert re.match(r"error: RuntimeError: train-detector failed on rank 0: RuntimeError: loss is (nan|inf) at step 2; "
                    r"lower --lr or check the data \(traceback in \S+\.log\)$", err[0]), err[0]
