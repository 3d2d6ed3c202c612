"""Model selection ("the best model is selected"): `finetune-normal --select-by fid`.

The record of scores and the choice of the best (training.model_selection) with given scores; the
harness hook with scripted scores on 2 Ray Train workers (the artifact is the best step's weights,
not the last step's); finetune-normal end to end with a tiny extractor on one rank (in this
process), resumed; bad input."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import LineFitTask, read_metrics, start_ray, write_phantom_shards

from cytosynth.training.model_selection import read_selection, record_score, step_url
from cytosynth.cluster.ray_train import train
from cytosynth.training.checkpoints import COMPLETE_MARKER, checkpoint_url
from cytosynth.training.train_config import TrainConfig
from cytosynth.jobs import cli
from cytosynth.synth import random_bundle, save_bundle
from cytosynth.synth.models import LORA_FILE

pytestmark = pytest.mark.timeout(1800)
TILE = 64
ARTIFACT = "model.bin"


# --------------------------------------------------------------------------- the record, given scores


def complete_checkpoint(out: str, step: int) -> None:
    """What the harness leaves once a checkpoint is complete (only its marker matters here)."""
    os.makedirs(checkpoint_url(out, step), exist_ok=True)
    with open(os.path.join(checkpoint_url(out, step), COMPLETE_MARKER), "w") as fh:
        fh.write("{}")


def run_scores(out: str, scores: dict[int, float], final: int, checkpoint: bool = True) -> list[dict[str, Any]]:
    """Play the harness: record each step's score, save "the model" (its step) where told, then
    checkpoint. Returns the verdicts."""
    verdicts = []
    for step, score in scores.items():
        verdict = record_score(out, step, step == final, score, ARTIFACT)
        if "save_to" in verdict:
            os.makedirs(verdict["save_to"], exist_ok=True)
            with open(os.path.join(verdict["save_to"], ARTIFACT), "w") as fh:
                fh.write(f"model of step {step}")
        if checkpoint and step != final:
            complete_checkpoint(out, step)
        verdicts.append(verdict)
    return verdicts


def artifact_text(out: str) -> str:
    with open(os.path.join(out, ARTIFACT)) as fh:
        return fh.read()


def test_every_score_is_recorded_and_the_artifact_is_the_best_not_the_last(tmp_path):
    out = str(tmp_path)
    verdicts = run_scores(out, {2: 5.0, 4: 2.0, 6: 3.0, 8: 4.0}, final=8)
    assert [(r["step"], r["fid"]) for r in read_selection(out)] == [(2, 5.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert [v.get("save_to") for v in verdicts] == [step_url(out, 2), step_url(out, 4), None, None]
    assert artifact_text(out) == "model of step 4"
    assert verdicts[-1] == {"artifact": os.path.join(out, ARTIFACT), "best_step": 4, "best_fid": 2.0,
                            "selection": os.path.join(out, "selection.jsonl")}


def test_a_best_final_step_is_saved_as_the_artifact_itself(tmp_path):
    out = str(tmp_path)
    verdicts = run_scores(out, {2: 5.0, 4: 6.0, 5: 1.0}, final=5)
    assert verdicts[-1]["save_to"] == out and verdicts[-1]["best_step"] == 5
    assert artifact_text(out) == "model of step 5"


def test_ties_keep_the_earlier_step_and_non_finite_scores_rank_last(tmp_path):
    out = str(tmp_path)
    verdicts = run_scores(out, {2: math.nan, 4: 3.0, 6: 3.0, 8: math.inf}, final=8)
    assert [r["fid"] for r in read_selection(out)] == [None, 3.0, 3.0, None]
    assert [("save_to" in v) for v in verdicts] == [True, True, False, False]  # a first score is always kept
    assert verdicts[-1]["best_step"] == 4 and artifact_text(out) == "model of step 4"


def test_resume_keeps_the_scores_up_to_the_last_checkpoint_and_the_best(tmp_path):
    out = str(tmp_path)
    run_scores(out, {2: 5.0, 4: 2.0}, final=8)
    # The crashed run scored step 6 (its best) and saved it, but died before checkpoint 6 was complete.
    run_scores(out, {6: 1.0}, final=8, checkpoint=False)
    first_rows = read_selection(out)
    verdicts = run_scores(out, {6: 3.0, 8: 4.0}, final=8)  # the resumed run, from checkpoint 4
    rows = read_selection(out)
    assert rows[:2] == first_rows[:2]  # steps 2 and 4 kept as they were, not scored again
    assert [(r["step"], r["fid"]) for r in rows] == [(2, 5.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert verdicts[-1]["best_step"] == 4 and artifact_text(out) == "model of step 4"


# --------------------------------------------------------------------------- the harness hook, scripted scores


@dataclass(frozen=True)
class ScriptedSelectTask(LineFitTask):
    """LineFitTask that selects by given scores, and keeps the weights it saw at each scored step."""

    scores: tuple[tuple[int, float], ...] = ()
    trains_in_bf16: ClassVar[bool] = True

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dtype = next(model.parameters()).dtype  # bf16 casts the parameters, not the batch
        return super().loss(model, tuple(t.to(dtype) for t in batch)).float()

    def sample_images(self, model: torch.nn.Module, seed: int) -> np.ndarray:
        return np.zeros((1, 8, 8, 3), np.uint8)  # the grids are not what this task tests

    def select(self, model: torch.nn.Module, out_url: str, step: int, final: bool) -> dict[str, Any]:
        seen = os.path.join(out_url, "seen", f"step_{step}.safetensors")
        os.makedirs(os.path.dirname(seen), exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, seen)
        return record_score(out_url, step, final, dict(self.scores)[step], "line.safetensors")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scripted task travels by value
    start_ray()
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_harness_saves_the_best_step_and_not_the_last(precision, ray_session, tmp_path):
    """Steps 2, 4, 6 score 3, 1, 2: the artifact must hold step 4's weights. Under bf16 the save
    is the collective float32 gather, which every rank must enter together."""
    out = str(tmp_path / "out")
    config = TrainConfig(out=out, steps=6, batch_size=16, lr=0.05, workers=2, checkpoint_every=2, sample_every=6,
                         log_every=1, progress=False, precision=precision)
    summary = train(config, ScriptedSelectTask(scores=((2, 3.0), (4, 1.0), (6, 2.0))))
    assert [(r["step"], r["fid"]) for r in read_selection(out)] == [(2, 3.0), (4, 1.0), (6, 2.0)]
    assert summary["best_step"] == 4 and summary["best_fid"] == 1.0
    assert summary["artifact"] == os.path.join(out, "line.safetensors")
    artifact = load_file(summary["artifact"])
    seen = {step: load_file(os.path.join(out, "seen", f"step_{step}.safetensors")) for step in (4, 6)}
    assert artifact["2.weight"].dtype == torch.float32  # the full-precision weights, also under bf16
    assert not torch.allclose(seen[4]["2.weight"], seen[6]["2.weight"], atol=1e-2)  # training moved on
    if precision == "fp32":
        assert torch.equal(artifact["2.weight"], seen[4]["2.weight"]) and torch.equal(artifact["2.bias"], seen[4]["2.bias"])
    else:  # the module rank 0 scored is the bf16 copy of the float32 weights saved
        assert torch.allclose(artifact["2.weight"], seen[4]["2.weight"], rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------- finetune-normal


class TinyFeatures(torch.nn.Module):
    """12 features: mean and std of 6 random conv channels (as tests/test_fid_job.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x / 128 - 1))))
        return 10 * torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("extractor") / "tiny.pt")
    torch.jit.script(TinyFeatures().eval()).save(path)
    return path


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
    return str(save_bundle(random_bundle("tiny"), tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("normal")), tiles=4, per_shard=2, size=TILE)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("held_out")), tiles=6, per_shard=3, size=TILE)


def finetune_args(data: str, out: str, model_dir: str, *extra: str) -> list[str]:
    return ["finetune-normal", "--data", data, "--out", out, "--model-dir", model_dir, "--tile-size", str(TILE),
            "--steps", "4", "--lr", "1e-1", "--workers", "1", "--device", "cpu", "--checkpoint-every", "2",
            "--sample-every", "4", "--sample-count", "2", "--sample-steps", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, shards, held_out, extractor, bundle_dir) -> dict:
    """Train 4 steps selecting by FID; then, as after a crash before `_SUCCESS`, run it again:
    it resumes from checkpoint 2 and scores step 4 again."""
    out = str(tmp_path_factory.mktemp("selected") / "out")
    args = finetune_args(shards, out, bundle_dir, "--select-by", "fid", "--select-real", held_out,
                         "--select-feature-extractor", extractor, "--select-count", "4")
    assert cli.main(args) == 0
    first = {"rows": read_selection(out), "summary": json.load(open(os.path.join(out, "_SUCCESS")))}
    os.remove(os.path.join(out, "_SUCCESS"))
    assert cli.main(args) == 0
    return {"out": out, "first": first, "summary": json.load(open(os.path.join(out, "_SUCCESS")))}


def lora_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def check_best(out: str, summary: dict) -> None:
    rows = read_selection(out)
    best = min(rows, key=lambda r: (r["fid"], r["step"]))
    assert (summary["best_step"], summary["best_fid"]) == (best["step"], best["fid"])
    artifact = lora_bytes(os.path.join(out, LORA_FILE))
    if best["step"] != 4:  # an earlier step's file, copied; the final step is saved straight to the artifact
        assert artifact == lora_bytes(os.path.join(step_url(out, best["step"]), LORA_FILE))


@pytest.mark.slow
def test_finetune_normal_scores_every_checkpoint_and_keeps_the_best(selected_run):
    first = selected_run["first"]
    assert [r["step"] for r in first["rows"]] == [2, 4]
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 for r in first["rows"])
    assert os.path.exists(os.path.join(step_url(selected_run["out"], 2), LORA_FILE))  # the first score is a best
    check_best(selected_run["out"], selected_run["summary"])


@pytest.mark.slow
def test_finetune_normal_resume_keeps_the_earlier_scores(selected_run):
    out = selected_run["out"]
    rows = read_selection(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0] == selected_run["first"]["rows"][0]  # step 2 kept, not scored again
    assert rows[1]["time"] > selected_run["first"]["rows"][1]["time"]  # step 4 trained and scored again
    assert [r["run"] for r in read_metrics(out)] == [0, 0, 1, 1]


@pytest.mark.slow
def test_finetune_normal_records_the_selection_settings(selected_run, held_out, extractor):
    with open(os.path.join(selected_run["out"], "job.json")) as fh:
        config = json.load(fh)["config"]
    with open(extractor, "rb") as fh:
        import hashlib

        sha = hashlib.sha256(fh.read()).hexdigest()
    assert (config["select_by"], config["select_count"], config["select_real"]) == ("fid", 4, held_out)
    assert config["select_feature_extractor"] == {"kind": "torchscript", "sha256": sha, "dim": 12, "file": extractor}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-real", "--select-by fid needs --select-real URL"),
        ("no-extractor", "--select-by fid needs --select-feature-extractor FILE"),
        ("missing-extractor", "no such file"),
        ("broken-extractor", "cannot load feature extractor"),
        ("empty-held-out", "no images at"),
        ("one-tile", "holds 1 image; FID needs at least 2"),
        ("count", "--select-count must be at least 2"),
        ("no-select-by", "need --select-by fid"),
    ],
)
def test_bad_selection_input_is_one_line_and_writes_nothing(case, message, tmp_path, capsys, shards, held_out,
                                                            extractor, bundle_dir):
    real, feature_extractor, count = held_out, extractor, "4"
    if case == "missing-extractor":
        feature_extractor = str(tmp_path / "nowhere.pt")
    elif case == "broken-extractor":
        feature_extractor = str(tmp_path / "broken.pt")
        (tmp_path / "broken.pt").write_bytes(b"this is not a TorchScript archive")
    elif case in ("empty-held-out", "one-tile"):
        real = str(tmp_path / "held_out")
        os.makedirs(real)
        if case == "one-tile":
            from PIL import Image

            Image.new("RGB", (TILE, TILE)).save(os.path.join(real, "000.png"))
    elif case == "count":
        count = "1"
    select = {"no-real": ["--select-by", "fid", "--select-feature-extractor", feature_extractor],
              "no-extractor": ["--select-by", "fid", "--select-real", real],
              "no-select-by": ["--select-real", real, "--select-feature-extractor", feature_extractor]}.get(
        case, ["--select-by", "fid", "--select-real", real, "--select-feature-extractor", feature_extractor])
    out = tmp_path / "out"
    code = cli.main(finetune_args(shards, str(out), bundle_dir, *select, "--select-count", count))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists() or not any(out.iterdir())
