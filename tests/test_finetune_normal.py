"""`cytosynth finetune-normal`: the stage-1 LoRA trained on 2 Ray Train workers (DeepSpeed ZeRO-2,
gloo, tiny preset) from s3:// shards, killed after a checkpoint and resumed; its file loads into
diffusers and into the generator; bad input fails with one line before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from training_helpers import EncoderCalls, changed_parameters, fake_aws_env, read_metrics, write_phantom_shards

from cytosynth import storage
from cytosynth.jobs import cli
from cytosynth.synth import random_bundle, save_bundle
from cytosynth.synth.models import LORA_FILE, load_normal_lora
from cytosynth.synth.normal import NORMAL_PROMPT
from cytosynth.synth.sampling import encode_text
from cytosynth.synth.ldm_training import diffusion_loss, load_sd_components, noise_scheduler, sample_latents
from cytosynth.training.normal_lora import NormalLoraTask

pytestmark = pytest.mark.timeout(1800)
TILE = 64
ATTN2_LORA_TARGETS = ("attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
    """The tiny preset's random weights as a model folder (what --model-dir points at)."""
    return str(save_bundle(random_bundle("tiny"), tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("normal")), tiles=4, per_shard=2, size=TILE)


@pytest.fixture(scope="module")
def s3_env(s3_server: str) -> dict[str, str]:
    """Environment of a subprocess that talks to the moto server (no real AWS config)."""
    return {**os.environ, **fake_aws_env(s3_server)}


@pytest.fixture(scope="module")
def s3_shards(s3_server: str, local_shards: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")
    bucket = f"normal-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    for folder in ("shards", "stats"):  # the tars and their commit markers
        fs.put(f"{local_shards}/{folder}", f"{bucket}/tiles/{folder}", recursive=True)
    return f"s3://{bucket}/tiles"


def test_each_tile_is_encoded_once_and_its_latent_drawn_afresh_every_epoch(local_shards, bundle_dir):
    """The VAE is frozen and the tiles come round every epoch: the step encodes only unseen tiles."""
    task = NormalLoraTask(local_shards, model_dir=bundle_dir, tile_size=TILE)
    model, _ = task.build(torch.device("cpu"))
    batches = task.batches(0, 1, 2, seed=0)  # 4 tiles: two batches an epoch
    with EncoderCalls(model.vae) as encoded:
        losses = [task.loss(model, next(batches)).item() for _ in range(6)]  # three epochs
    assert encoded == [2, 2] and len(model.posteriors) == 4
    assert len(set(losses)) == 6  # fresh noise, timesteps and latent draws each step


def finetune_command(data: str, out: str, model_dir: str) -> list[str]:
    """10 steps at lr 0.1: on the tiny random model the LoRA needs big steps to move the loss visibly."""
    return [sys.executable, "-m", "cytosynth.jobs.cli", "finetune-normal", "--data", data, "--out", out,
            "--model-dir", model_dir, "--tile-size", str(TILE), "--steps", "10", "--lr", "1e-1", "--workers", "2",
            "--device", "cpu", "--checkpoint-every", "3", "--sample-every", "4", "--log-every", "1",
            "--sample-count", "2", "--sample-steps", "2", "--quiet"]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, like a machine losing power.

    Ray workers may outlive a killed driver for a moment; they must not finish the run."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")  # minutes on a loaded 2-core machine: the tests using it are marked slow
def trained(tmp_path_factory, s3_shards, s3_env, bundle_dir) -> dict:
    """Train from s3:// shards; SIGKILL the whole run once a checkpoint is complete; run the same
    command again to the end. Returns what the killed run left and the output folder."""
    out = str(tmp_path_factory.mktemp("finetune") / "out")
    logs = tmp_path_factory.mktemp("logs")
    command = finetune_command(s3_shards, out, bundle_dir)
    with open(logs / "first.log", "wb") as log:
        first = subprocess.Popen(command, env=s3_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        marker = os.path.join(out, "checkpoints", "step_000003", "COMPLETE")
        deadline = time.monotonic() + 900
        while not os.path.exists(marker):
            assert first.poll() is None, (logs / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.2)
        kill_tree(first.pid)  # the driver, the local Ray it started and its training workers
        first.wait()
    killed = {"files": sorted(os.listdir(out)), "checkpoints": sorted(os.listdir(os.path.join(out, "checkpoints")))}
    # What a kill during a sample grid's write leaves (the kill above may or may not land in one).
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    with open(os.path.join(out, "samples", ".tmp-step_000004.png.0123456789abcdef"), "wb") as half:
        half.write(b"half a png")
    second = subprocess.run(command, env=s3_env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "killed": killed, "stdout": second.stdout}


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(trained):
    assert "_SUCCESS" not in trained["killed"]["files"] and LORA_FILE not in trained["killed"]["files"]
    rows = read_metrics(trained["out"])
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 11))
    resumed_at = next(r["step"] for r in rows if r["run"] == 1) - 1
    assert resumed_at in (3, 6, 9)  # a checkpoint step: training went on from there, not from 0
    assert all(r["run"] == (0 if r["step"] <= resumed_at else 1) for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "finetune-normal finished 10 steps on 2 workers" in trained["stdout"]


@pytest.mark.slow
def test_sample_grids_show_progress_and_a_killed_runs_half_written_grid_is_gone(trained):
    samples = os.path.join(trained["out"], "samples")
    assert sorted(os.listdir(samples)) == ["step_000004.png", "step_000008.png", "step_000010.png"]
    assert Image.open(os.path.join(samples, "step_000010.png")).size == (2 * TILE + 12, TILE + 8)


@pytest.mark.slow
def test_only_the_cross_attention_projections_change(trained, bundle_dir):
    base = UNet2DConditionModel.from_pretrained(bundle_dir, subfolder="unet")
    tuned = UNet2DConditionModel.from_pretrained(bundle_dir, subfolder="unet")
    load_normal_lora(tuned, os.path.join(trained["out"], LORA_FILE))  # merged, as generate does
    changed = changed_parameters(base.state_dict(), tuned.state_dict())
    assert changed and all(name.endswith(ATTN2_LORA_TARGETS) for name in changed)
    assert {t for t in ATTN2_LORA_TARGETS if any(name.endswith(t) for name in changed)} == set(ATTN2_LORA_TARGETS)


@pytest.mark.slow
def test_loss_falls_on_the_training_tiles(trained, bundle_dir, local_shards):
    """The LDM loss on the 4 training tiles, same noise and timesteps, before and after."""
    sd = load_sd_components(bundle_dir)
    tiles = torch.from_numpy(np.stack([s["image"] for s in storage.read_samples(local_shards)]))
    context = encode_text(sd.tokenizer, sd.text_encoder, [NORMAL_PROMPT])[0].expand(len(tiles), -1, -1)
    scheduler = noise_scheduler(sd.scheduler_config)

    def mean_loss(unet: UNet2DConditionModel) -> float:
        losses = []
        with torch.no_grad():
            for seed in range(8):
                torch.manual_seed(seed)
                losses.append(diffusion_loss(unet, scheduler, sample_latents(sd.vae, tiles), context).item())
        return float(np.mean(losses))

    before = mean_loss(sd.unet)
    load_normal_lora(sd.unet, os.path.join(trained["out"], LORA_FILE))
    assert mean_loss(sd.unet) < before


@pytest.mark.slow
def test_diffusers_load_lora_weights_reads_the_file(trained):
    tiny = random_bundle("tiny")
    pipe = StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.unet, tiny.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def draw() -> np.ndarray:
        return pipe(NORMAL_PROMPT, height=TILE, width=TILE, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = draw()
    pipe.load_lora_weights(trained["out"], weight_name=LORA_FILE)
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    assert not np.array_equal(draw(), plain)


@pytest.mark.slow
def test_generate_uses_the_lora(trained, bundle_dir, tmp_path):
    def tile(*extra: str) -> np.ndarray:
        out = str(tmp_path / f"gen{len(extra)}")
        args = ["generate", "--preset", "tiny", "--model-dir", bundle_dir, "--num-tiles", "1", "--tile-size", "256",
                "--steps", "2", "--cells", "1-1", "--device", "cpu", "--quiet", "--out", out, *extra]
        assert cli.main(args) == 0
        return next(storage.read_samples(out))["image"]

    assert not np.array_equal(tile("--lora", os.path.join(trained["out"], LORA_FILE)), tile())


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no images at"),
        ("empty", "no images at"),
        ("wrong-size", f"is {TILE}x{TILE}, expected 128x128 (--tile-size)"),
        ("no-unet", "missing the unet/ folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, message, tmp_path, capsys, local_shards, bundle_dir):
    data, model_dir, tile_size = local_shards, bundle_dir, TILE
    if case == "missing":
        data = str(tmp_path / "nowhere")
    elif case == "empty":
        data = str(tmp_path / "empty")
        os.makedirs(data)
    elif case == "wrong-size":
        tile_size = 128
    else:
        model_dir = str(tmp_path / "model")
        os.makedirs(model_dir)
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            os.symlink(os.path.join(bundle_dir, part), os.path.join(model_dir, part))
    out = tmp_path / "out"
    code = cli.main(["finetune-normal", "--data", data, "--out", str(out), "--model-dir", model_dir,
                     "--tile-size", str(tile_size), "--steps", "2", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())
