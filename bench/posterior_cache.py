"""The VAE posterior cache's gain: seconds per training step of finetune-normal's and
finetune-abnormal's models with each image's posterior kept (`PosteriorCache`) against encoded
every step (the same cache bounded at 0 bytes).

In process, without Ray or DeepSpeed: each job's own task (`build`, `batches`, `loss`) on the data
and base of a miniature study's work folder, and Adam on the task's trainable parameters. Both arms
start from the same seed, so their losses should agree (the cache changes what is computed, not
what is drawn); the timing leaves out the first `--warmup` steps, where the cache fills. Arms
alternate, `--repeats` times each.

    python bench/miniature.py --quick --out /tmp/mq          # a study folder (minutes), or a full run's
    python bench/posterior_cache.py --study /tmp/mq --steps 200 --warmup 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from cytosynth.synth.ldm_training import PosteriorCache
from cytosynth.training.abnormal_cells import AbnormalCellTask
from cytosynth.training.normal_lora import NormalLoraTask

import mini_data
from miniature import FULL, PRESET

# Each job as the full study runs it (bench/miniature.py): the task, its batch size and learning rate.
JOBS: dict[str, Callable[[str], tuple[object, int, float]]] = {
    "finetune-normal": lambda study: (NormalLoraTask(
        os.path.join(study, "data", "target_nilm"), model_dir=os.path.join(study, "base"), preset=PRESET,
        tile_size=mini_data.STAGE1_TILE), FULL.lora_batch, FULL.lora_lr),
    "finetune-abnormal": lambda study: (AbnormalCellTask(
        os.path.join(study, "data", "abnormal_train"), model_dir=os.path.join(study, "base"), preset=PRESET,
        box_size="normal"), FULL.acs_batch, FULL.acs_lr),
}


def time_steps(job: str, study: str, cached: bool, steps: int, warmup: int, seed: int) -> dict:
    """`steps` training steps of `job`'s model; seconds a step after `warmup`, and the losses."""
    task, batch_size, lr = JOBS[job](study)
    torch.manual_seed(seed)
    model, trainable = task.build(torch.device("cpu"))
    model.posteriors = PosteriorCache() if cached else PosteriorCache(max_bytes=0)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    batches = task.batches(0, 1, batch_size, seed)
    losses, started = [], None
    for step in range(1, steps + 1):
        if step == warmup + 1:
            started = time.perf_counter()
        loss = task.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = (time.perf_counter() - started) / (steps - warmup)
    return {"job": job, "cache": cached, "s_per_step": round(seconds, 4), "cached_images": len(model.posteriors),
            "loss_at": {s: round(losses[s - 1], 6) for s in (1, warmup, steps)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="a bench/miniature.py work folder (its data/ and base/)")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100, help="steps left out of the timing (the cache fills)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for job in args.jobs:
        for _ in range(args.repeats):
            for cached in (False, True):
                row = time_steps(job, args.study, cached, args.steps, args.warmup, args.seed)
                print(json.dumps(row), flush=True)
                rows.append(row)
    for job in args.jobs:
        mean = {c: statistics.mean(r["s_per_step"] for r in rows if r["job"] == job and r["cache"] == c) for c in (False, True)}
        print(f"{job}: {mean[False]:.4f} s/step encoding every step, {mean[True]:.4f} with the cache "
              f"({1 - mean[True] / mean[False]:.0%} less)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
