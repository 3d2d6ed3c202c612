"""The shipped miniature bundle (models/mini, made by bench/miniature.py): what the study measured.

A reduced study: `cytosynth generate` with the shipped bundle edits real phantom NILM tiles, and the
shipped cell classifier (the study's FID feature extractor) names the edited cells' classes above
chance, and better than for edits of the untrained ACS (finetune-abnormal's initialisation).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cytosynth.jobs.cli import main as cytosynth
from cytosynth.synth.models import acs_unet_from_base, load_bundle
from cytosynth.synth.phantom_classes import CELL_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "models", "mini")
CLASSIFIER = os.path.join(BUNDLE, "classifier", "cell_classifier.pt2")
CHANCE = 0.25  # four abnormal classes

pytestmark = pytest.mark.slow


def test_the_shipped_bundle_is_small_loads_and_records_how_it_was_made():
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUNDLE) for f in fs if f.endswith(".safetensors")]
    assert 0 < sum(sizes) <= 15 * 2**20
    manifest = json.load(open(os.path.join(BUNDLE, "MANIFEST.json")))
    assert manifest["made_by"].startswith("python bench/miniature.py") and manifest["git_commit"]
    bundle = load_bundle(BUNDLE, preset="mini")
    assert bundle.acs_unet.config.in_channels == 9 and bundle.preset.name == "mini"


def _edit_accuracy(tmp_path, name: str, *extra: str) -> float:
    import sys

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from mini_classifier import accuracy, predict
    from mini_measure import edited_crops

    out = str(tmp_path / name)
    code = cytosynth(["generate", "--preset", "mini", "--model-dir", BUNDLE, "--normal-source", "phantom",
                      "--tile-size", "1024", "--num-tiles", "1", "--cells", "8-8", "--steps", "10", "--seed", "3",
                      "--device", "cpu", "--quiet", "--out", out, *extra])
    assert code == 0
    crops, labels, _ = edited_crops(out)
    assert len(labels) == 8
    return accuracy(predict(CLASSIFIER, crops), labels, tuple(range(1, len(CELL_CLASSES))))


@pytest.fixture(scope="module")
def untrained_acs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("acs") / "untrained"
    acs_unet_from_base(load_bundle(BUNDLE, preset="mini").unet).save_pretrained(folder, safe_serialization=True)
    return str(folder)


# One 1024 tile, 8 edits at 10 DDIM steps: a reduced run of the study's edit measurement (the
# seventh full run: 77.8% of 72 edits at 25 steps, untrained 22.2%; bench/RESULTS.md).
def test_edits_of_the_trained_acs_are_classified_above_chance_and_above_the_untrained_acs(tmp_path, untrained_acs):
    trained = _edit_accuracy(tmp_path, "trained")
    untrained = _edit_accuracy(tmp_path, "untrained", "--acs-unet", untrained_acs)
    assert trained > CHANCE + 0.15, (trained, untrained)
    assert trained > untrained, (trained, untrained)


def test_the_shipped_vae_gives_latents_of_unit_std_as_the_noise_schedule_assumes():
    """SD1.5's scaling_factor (0.18215) fits SD1.5's autoencoder only; the miniature's VAE carries its own."""
    import torch

    from cytosynth.synth.phantom_classes import draw_labelled_tile
    from cytosynth.synth.ldm_training import sample_latents

    vae = load_bundle(BUNDLE, preset="mini").vae.float()
    tiles = np.stack([draw_labelled_tile(s, 256, scale=1.0, abnormal=(0, 0)).image for s in range(900_000, 900_004)])
    with torch.no_grad():
        std = float(sample_latents(vae, torch.from_numpy(tiles)).std())
    assert 0.7 < std < 1.4


_PRETRAIN = """
import sys
sys.path.insert(0, sys.argv[1])
from mini_pretrain import pretrain_base
data, out = sys.argv[2], sys.argv[3]
pretrain_base(data + "/base", data + "/target", data + "/target", out, "mini", 2, 2, 128, 2, 2, 0, lambda message: None)
"""


def test_base_pretraining_makes_the_same_weights_in_two_processes(tmp_path):
    """The VAE's posterior draws and the UNet's noise come from torch's global RNG, which torch
    seeds afresh in each process: the study seeds it, so a rerun pretrains the same base."""
    import hashlib
    import subprocess
    import sys

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import mini_data

    data = tmp_path / "data"
    tiles, captions = mini_data.base_tiles(4)
    mini_data.write_png_folder(str(data / "base"), tiles)
    (data / "base" / "captions.json").write_text(json.dumps(captions))
    mini_data.write_png_folder(str(data / "target"), [t.image for t in mini_data.nilm_tiles("target_nilm", 2, 256)])

    def weights(name: str) -> list[str]:
        out = tmp_path / name
        subprocess.run([sys.executable, "-c", _PRETRAIN, os.path.join(ROOT, "bench"), str(data), str(out)], check=True)
        return [hashlib.sha256((out / part / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
                for part in ("vae", "unet")]

    assert weights("first") == weights("second")
