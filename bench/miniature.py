"""The miniature of the paper: the whole method, trained from scratch on a phantom domain with known truth.

    python bench/miniature.py --out /tmp/mini            # the full study (about an hour on 2 CPU cores)
    python bench/miniature.py --quick --out /tmp/mini-q  # the same steps at smoke-test sizes (minutes)
    python bench/miniature.py --out /tmp/mini --ship models/mini   # and copy the bundle into the repo

Steps, each resumable (a finished step is skipped when re-run with the same --out):

1. data: labelled phantom sets (`bench/mini_data.py`), disjoint seed ranges.
2. base: VAE + text-to-image UNet pretrained on the many-style base domain (`bench/mini_pretrain.py`),
   the stand-in for SD1.5. Not a product job: nothing in `generate` trains.
3. `cytosynth finetune-normal` on target-style NILM tiles (the LoRA).
4. `cytosynth finetune-abnormal --box-size normal` on 256x256 crops of abnormal cells (the ACS),
   each cell in a box of a normal cell's size, as generate edits.
5. `cytosynth train-detector --labels nilm` (the cell detector stage 2 picks cells from).
6. a 5-class cell classifier on real crops, exported as a .pt2 for `cytosynth fid --feature-extractor`.
7. the bundle: base + LoRA + ACS, a `--model-dir` folder (`--preset mini`) with MANIFEST.json.
8. measurements with the product's own commands (`bench/mini_measure.py`): Table I, per-class FID
   and classifier accuracy of edits, Table II (augmentation-study per seed), locality, annotation truth.

Results: <out>/results.json, <out>/results.md and the pictures under <out>/figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Every step runs alone, so each process takes the machine's two cores (a UNet step of batch 16:
# 0.63 s on one thread, 0.34 s on two, idle machine). On a CPU shared with other work set
# OMP_NUM_THREADS=1: there a second spinning OpenMP thread made a VAE step 10x slower (measured).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
THREADS = os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

import mini_data  # noqa: E402
from mini_data import Sizes  # noqa: E402


@dataclass(frozen=True)
class Study:
    sizes: Sizes
    text_steps: int  # the CLIP stand-in's (mini_pretrain.train_text_encoder)
    vae_steps: int
    vae_crop: int  # the VAE trains on random crops of this side (it is convolutional)
    unet_steps: int
    unet_batch: int
    lora_steps: int
    lora_lr: float
    lora_batch: int
    acs_steps: int
    acs_lr: float
    acs_batch: int
    nilm_detector_steps: int
    detector_epochs: float  # passes over R per Table II arm, S on top (the paper's 20; RESULTS.md, ninth run)
    detector_lr: float  # SGD; the paper's 2e-4 is for a pretrained backbone (RESULTS.md, eighth run)
    detector_max_grad_norm: float  # at lr 0.01 unclipped, an R + S detector diverged (eighth run)
    detector_roi_samples: int  # proposals per tile for the box head: 1-3 cells need fewer than COCO's 512
    detector_seeds: tuple[int, ...]
    classifier_steps: int
    table1_tiles: int  # stage-1 tiles generated per arm
    edit_cells: str  # generate --cells for the edit sets
    sample_steps: int  # DDIM steps of every generate run (paper: 25)


FULL = Study(
    sizes=Sizes(base=384, target_nilm=64, target_real=48, abnormal_train=192, detector_real=12,
                abnormal_test=32, edit_sources=24),
    text_steps=200, vae_steps=2500, vae_crop=128, unet_steps=2500, unet_batch=16, lora_steps=300, lora_lr=1e-3,
    lora_batch=2, acs_steps=6000, acs_lr=5e-4, acs_batch=4, nilm_detector_steps=8, detector_epochs=20, detector_lr=0.01,
    detector_max_grad_norm=10.0, detector_roi_samples=128, detector_seeds=(0, 1),
    classifier_steps=600, table1_tiles=48, edit_cells="3-3", sample_steps=25,
)
QUICK = Study(
    sizes=Sizes(base=24, target_nilm=8, target_real=8, abnormal_train=16, detector_real=8,
                abnormal_test=8, edit_sources=4),
    text_steps=20, vae_steps=20, vae_crop=128, unet_steps=20, unet_batch=4, lora_steps=6, lora_lr=1e-3, lora_batch=2,
    acs_steps=6, acs_lr=5e-4, acs_batch=4, nilm_detector_steps=2, detector_epochs=0.5, detector_lr=0.01,
    detector_max_grad_norm=10.0, detector_roi_samples=128, detector_seeds=(0,), classifier_steps=30,
    table1_tiles=4, edit_cells="2-2", sample_steps=4,
)
PRESET = "mini"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


CLI = [sys.executable, "-m", "cytosynth.jobs.cli"]  # the product's command line, unchanged


def cytosynth(*args: str) -> list[str]:
    """Run one product command and return the argv, for the record."""
    log("$ cytosynth " + " ".join(args))
    start = time.time()
    subprocess.run([*CLI, *args], check=True)
    log(f"  done in {time.time() - start:.0f} s")
    return ["cytosynth", *args]


def cytosynth_started(log_path: str, *args: str) -> subprocess.Popen:
    """Start one product command in the background, its output to `log_path`; the caller waits."""
    log(f"$ cytosynth {' '.join(args)} &  (output: {log_path})")
    with open(log_path, "w") as output:
        return subprocess.Popen([*CLI, *args], stdout=output, stderr=subprocess.STDOUT)


@contextmanager
def threads_per_process(n: int):
    """This process and the commands it starts meanwhile use `n` threads each. Two one-thread
    detectors side by side train 1.28x faster in all than one on two threads (RESULTS.md, tenth run)."""
    import torch

    saved, saved_torch = {k: os.environ[k] for k in THREAD_VARS}, torch.get_num_threads()
    os.environ.update({k: str(n) for k in THREAD_VARS})
    torch.set_num_threads(n)
    try:
        yield
    finally:
        os.environ.update(saved)
        torch.set_num_threads(saved_torch)


class Steps:
    """Runs each step once per --out: a step's record is kept in <out>/steps.json when it finishes."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, "steps.json")
        self.done = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def run(self, name: str, fn, *args):
        if name in self.done:
            log(f"step {name}: done before, kept")
            return self.done[name]
        log(f"step {name}")
        start = time.time()
        record = fn(*args) or {}
        record = {**record, "seconds": round(time.time() - start)}
        self.done[name] = record
        with open(self.path, "w") as fh:
            json.dump(self.done, fh, indent=2)
        return record


# Larger than any job's steps: the harness checkpoints and samples at the last step anyway, so this
# gives one of each, at the end, also where --epochs leaves the step count to the job.
AT_THE_END_ONLY = "1000000"


def harness_options(batch: int, lr: float | None = None, *, steps: int | None = None,
                    epochs: float | None = None) -> list[str]:
    """The harness options of one training job: its length in `steps`, or in `epochs` over the
    real set (train-detector counts the steps). One worker, so ZeRO stage 0: stage 2 partitions
    nothing there and cost a detector 15% of its step (RESULTS.md, "ZeRO stage 2 against 0")."""
    length = ["--steps", str(steps)] if epochs is None else ["--epochs", str(epochs)]
    extra = ["--lr", str(lr)] if lr is not None else []
    return [*length, "--batch-size", str(batch), *extra, "--device", "cpu", "--workers", "1", "--zero-stage", "0",
            "--checkpoint-every", AT_THE_END_ONLY, "--sample-every", AT_THE_END_ONLY, "--log-every", "10", "--quiet"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder: data, models, measurements")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes)")
    parser.add_argument("--ship", help="copy the trained bundle to this folder (e.g. models/mini)")
    parser.add_argument("--seed", type=int, default=0)
    # Accepted for the runs recorded in RESULTS.md; every job starts its own local Ray (a shared
    # one, tried first, left Ray Train's controller waiting for its worker).
    parser.add_argument("--own-ray", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    study = QUICK if args.quick else FULL
    import torch

    torch.set_num_threads(int(THREADS))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    steps = Steps(out)
    started = time.time()
    d = os.path.join(out, "data")
    base, lora, acs = (os.path.join(out, n) for n in ("base", "lora", "acs"))
    nilm_det, clf = os.path.join(out, "nilm_detector"), os.path.join(out, "classifier.pt2")
    bundle = os.path.join(out, "bundle")
    records: dict[str, object] = {"study": asdict(study), "quick": args.quick, "threads_per_process": THREADS}

    paths = mini_data.write_all(d, study.sizes)
    records["data"] = paths

    from mini_pretrain import pretrain_base

    records["base"] = steps.run("base", pretrain_base, paths["base"], paths["target_nilm"], paths["real_a"], base,
                                PRESET, study.text_steps, study.vae_steps, study.vae_crop, study.unet_steps,
                                study.unet_batch, args.seed, log)
    records["lora"] = steps.run("lora", lambda: {"command": cytosynth(
        "finetune-normal", "--data", paths["target_nilm"], "--model-dir", base, "--preset", PRESET,
        "--tile-size", str(mini_data.STAGE1_TILE), "--sample-count", "2", "--sample-steps", "10", "--out", lora,
        *harness_options(study.lora_batch, study.lora_lr, steps=study.lora_steps), "--seed", str(args.seed))})
    records["acs"] = steps.run("acs", lambda: {"command": cytosynth(
        "finetune-abnormal", "--data", paths["abnormal_train"], "--model-dir", base, "--preset", PRESET,
        "--box-size", "normal", "--sample-count", "2", "--sample-steps", "10", "--out", acs,
        *harness_options(study.acs_batch, study.acs_lr, steps=study.acs_steps), "--seed", str(args.seed))})
    records["nilm_detector"] = steps.run("nilm_detector", lambda: {"command": cytosynth(
        "train-detector", "--real", paths["target_nilm_shards"], "--labels", "nilm",
        "--image-size", str(mini_data.STAGE1_TILE), "--loader-workers", "1", "--out", nilm_det,
        *harness_options(2, steps=study.nilm_detector_steps), "--seed", str(args.seed))})

    from mini_classifier import export_classifier, train_classifier

    def classifier() -> dict:
        tiles = mini_data.abnormal_tiles("abnormal_train", study.sizes.abnormal_train)
        crops, labels = mini_data.cell_crops(tiles)
        export_classifier(train_classifier(crops, labels, study.classifier_steps, args.seed, log), clf)
        return {"crops": len(crops), "per_class": mini_data.count_classes(tiles)}

    records["classifier"] = steps.run("classifier", classifier)

    import mini_bundle

    records["bundle"] = steps.run("bundle", mini_bundle.assemble, out, base, lora, acs, records, argv or sys.argv[1:])
    if args.ship:
        mini_bundle.ship(bundle, args.ship)
        log(f"bundle copied to {args.ship}")

    import mini_measure

    records["measure"] = steps.run("measure", mini_measure.measure, out, paths, study, cytosynth, log)
    records["wall_seconds"] = round(time.time() - started)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(records, fh, indent=2, default=str)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(mini_measure.report(records))
    log(f"results in {out}/results.json and results.md ({records['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "FULL", "QUICK", "shutil"]
