"""The fine-tuning harness (training.loop): Ray Train workers running DeepSpeed ZeRO-2 on CPU,
checkpoints with a COMPLETE marker, resume after a failure, metrics, sample grids, the artifact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import LineFitTask, SampledLineFitTask, changed_parameters, initial_line_model, read_metrics, start_ray

from cytosynth.cluster.ray_train import train
from cytosynth.training.checkpoints import checkpoint_steps, latest_checkpoint, remove_checkpoints
from cytosynth.training.loop import check_config, image_grid
from cytosynth.training.train_config import TrainConfig
from cytosynth import storage
from cytosynth.synth import InvalidInputError

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    start_ray()
    yield
    ray.shutdown()


def sampled_path(tmp_path_factory: pytest.TempPathFactory):
    """Where resumed_run's task records the model of its last sample grid."""
    return tmp_path_factory.getbasetemp() / "harness-last-sampled.safetensors"


@pytest.fixture(scope="module")  # minutes on a loaded 2-core machine: the tests using it are marked slow
def resumed_run(ray_session, tmp_path_factory):
    """8 steps on 2 workers, checkpoint every 4; the first attempt hits corrupt data at step 6,
    the second resumes, recording the model of each sample grid (the last: after step 8).
    Returns (out, error of the first attempt, checkpoints seen after it, summary)."""
    out = str(tmp_path_factory.mktemp("harness") / "out")
    config = TrainConfig(out=out, steps=8, batch_size=16, lr=0.05, workers=2, checkpoint_every=4,
                         sample_every=4, log_every=1, progress=False)
    with pytest.raises(InvalidInputError) as failure:
        train(config, LineFitTask(fail_after=5))
    after_failure = (checkpoint_steps(out, complete_only=False), os.path.exists(os.path.join(out, "_SUCCESS")))
    summary = train(config, SampledLineFitTask(sampled_to=str(sampled_path(tmp_path_factory))))
    return out, failure.value, after_failure, summary


@pytest.mark.slow
def test_worker_error_reaches_the_caller_as_itself(resumed_run):
    _, error, (checkpoints, success), _ = resumed_run
    assert "is corrupt" in str(error) and "\n" not in str(error)
    assert checkpoints == [4] and not success  # step 4 was checkpointed, the run never finished


@pytest.mark.slow
def test_resume_continues_from_the_last_complete_checkpoint(resumed_run):
    out, _, _, summary = resumed_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # rows 5.. of the failed attempt are replaced
    assert [r["run"] for r in rows] == [0] * 4 + [1] * 4
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["lr"] == 0.05 for r in rows)
    # The resumed run starts from step 4's weights, not from scratch: its first loss is step 4's level
    # (measured 2.06 after 4.64 at step 1; about 4.6 again when the checkpoint is not loaded).
    assert rows[4]["loss"] < 0.6 * rows[0]["loss"]
    assert summary["steps"] == 8 and summary["workers"] == 2
    assert summary["artifact"] == os.path.join(out, "line.safetensors")


@pytest.mark.slow
def test_loss_falls_and_only_the_trainable_layer_changed(resumed_run):
    out, *_ = resumed_run
    before = initial_line_model()
    after = initial_line_model()
    after.load_state_dict(load_file(os.path.join(out, "line.safetensors")))
    assert changed_parameters(before.state_dict(), after.state_dict()) == ["2.bias", "2.weight"]
    x = torch.linspace(-1, 1, 101).reshape(-1, 1)
    with torch.no_grad():
        loss_before = torch.nn.functional.mse_loss(before(x), 3 * x - 1)
        loss_after = torch.nn.functional.mse_loss(after(x), 3 * x - 1)
    assert loss_after < 0.35 * loss_before  # measured 0.24; 0.53 when the resume restarts from scratch


@pytest.mark.slow
def test_the_artifact_is_the_model_after_the_last_step(resumed_run, tmp_path_factory):
    out, *_ = resumed_run
    after_last_step = load_file(sampled_path(tmp_path_factory))
    artifact = load_file(os.path.join(out, "line.safetensors"))
    assert artifact.keys() == after_last_step.keys()
    assert all(torch.equal(artifact[k], after_last_step[k]) for k in artifact)
    assert not torch.equal(artifact["2.weight"], initial_line_model().state_dict()["2.weight"])


@pytest.mark.slow
def test_checkpoints_samples_and_records(resumed_run):
    out, *_ = resumed_run
    marker = json.load(open(os.path.join(out, "checkpoints", "step_000004", "COMPLETE")))
    assert marker["step"] == 4 and marker["world_size"] == 2
    # ZeRO-2: the trainable weights once, the optimizer state in one partition per worker.
    assert marker["files"] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000004.png", "step_000008.png"]
    assert Image.open(os.path.join(out, "samples", "step_000008.png")).size == (44, 24)  # 2 tiles of 16, 3 gutters of 4
    job = json.load(open(os.path.join(out, "job.json")))
    assert job["config"]["job"] == "line-fit" and job["config"]["lr"] == 0.05
    assert json.load(open(os.path.join(out, "_SUCCESS")))["final_loss"] == read_metrics(out)[-1]["loss"]


@pytest.mark.slow
def test_job_json_is_written_first_and_success_last(resumed_run):
    out, *_ = resumed_run
    written = {os.path.relpath(os.path.join(folder, name), out): os.stat(os.path.join(folder, name)).st_mtime_ns
               for folder, _, names in os.walk(out) for name in names}
    others = [t for name, t in written.items() if name not in ("job.json", "_SUCCESS")]
    assert "line.safetensors" in written and len(others) > 5
    assert written["job.json"] < min(others) and written["_SUCCESS"] > max(others)


@pytest.mark.slow
def test_a_finished_run_is_not_repeated(resumed_run):
    out, *_, summary = resumed_run
    before = open(os.path.join(out, "metrics.jsonl")).read()
    again = train(TrainConfig(out=out, steps=8, batch_size=16, lr=0.05, workers=2, progress=False), LineFitTask())
    assert again == summary and open(os.path.join(out, "metrics.jsonl")).read() == before


@pytest.mark.parametrize("change", [{"lr": 0.01}, {"batch_size": 8}, {"optimizer": "sgd"}])
@pytest.mark.slow
def test_a_finished_run_rerun_with_other_settings_is_refused(resumed_run, change):
    out, *_, summary = resumed_run
    before = open(os.path.join(out, "_SUCCESS")).read()
    settings = {"out": out, "steps": 8, "batch_size": 16, "lr": 0.05, "workers": 2, "progress": False, **change}
    with pytest.raises(storage.StorageError, match="different job config") as refused:
        train(TrainConfig(**settings), LineFitTask())
    assert next(iter(change)) in str(refused.value)
    assert open(os.path.join(out, "_SUCCESS")).read() == before


def test_one_rank_trains_in_this_process_without_ray_and_resumes_there(tmp_path, monkeypatch):
    """--workers 1 without --ray-address: the ranks' loop in a torch.distributed group of one in
    this process, never Ray; a run stopped by bad data resumes from its checkpoint as on Ray."""
    from cytosynth.cluster import ray_session

    def no_ray(*_args, **_kwargs):
        raise AssertionError("one rank must not start Ray")

    monkeypatch.setattr(ray_session, "connect", no_ray)
    out = str(tmp_path / "out")
    config = TrainConfig(out=out, steps=8, batch_size=16, lr=0.05, workers=1, checkpoint_every=4, sample_every=4,
                         log_every=1, progress=False)
    with pytest.raises(InvalidInputError, match="sample 6 on rank 0 is corrupt"):
        train(config, LineFitTask(fail_after=5))
    assert checkpoint_steps(out) == [4] and not os.path.exists(os.path.join(out, "_SUCCESS"))
    summary = train(config, LineFitTask())
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and [r["run"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[4]["loss"] < 0.6 * rows[0]["loss"]  # resumed from step 4's weights
    assert summary["workers"] == 1 and os.path.exists(summary["artifact"])
    assert train(config, LineFitTask()) == summary  # a finished run is not repeated, here either


def test_only_complete_checkpoints_count_and_partial_ones_are_removed(tmp_path):
    out = str(tmp_path)
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (folder / "COMPLETE").write_text("{}")
    assert latest_checkpoint(out) == 20
    assert checkpoint_steps(out, complete_only=False) == [10, 20, 30]
    remove_checkpoints(out, keep=1)
    assert checkpoint_steps(out, complete_only=False) == [20]


@pytest.mark.parametrize(
    "change, message",
    [({"steps": 0}, "--steps must be at least 1"), ({"optimizer": "lion"}, "unknown optimizer"),
     ({"lr": 0.0}, "--lr must be positive"), ({"zero_stage": 3}, "--zero-stage")],
)
def test_bad_settings_are_refused_before_any_work(change, message, tmp_path):
    with pytest.raises(InvalidInputError, match=message):
        check_config(TrainConfig(out=str(tmp_path), **change))


def test_image_grid_places_images_in_a_near_square():
    images = np.stack([np.full((4, 6, 3), i, np.uint8) for i in (10, 20, 30)])
    grid = image_grid(images, gutter=1)
    assert grid.shape == (2 * 5 + 1, 2 * 7 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 8, 0] == 20 and grid[6, 1, 0] == 30 and grid[6, 8, 0] == 255

