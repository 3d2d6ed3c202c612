"""Fine-tuning throughput: samples/s and peak GPU memory of each training job, ZeRO-2 vs plain DDP.

Each job runs through its own command (`cytosynth finetune-normal`, `finetune-abnormal`,
`train-detector`), so what is measured is the product: Ray Train workers, DeepSpeed, the
streaming data path. The paper's settings by default: full-size SD1.5 architecture with random
weights (the same cost as real ones), 1024x1024 tiles, batch 1 (normal LoRA), 4 (ACS) and 2
(detector). The data are phantom tiles with edited cells made by `cytosynth generate` (tiny
preset), so every job has the boxes it needs.

Per run: the median samples/s over the steps after `--warmup` (from metrics.jsonl, which the
harness times per step) and rank 0's peak allocated GPU memory. `--zero-stage 0` is DeepSpeed's
plain data parallel (an all-reduce of the gradients, unpartitioned optimizer state).

    python bench/finetune.py --device cuda --workers 1                 # on a GPU machine
    python bench/finetune.py --device cpu --preset tiny --tile-size 256 --steps 4 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

JOBS = {  # job -> (command, its data option, paper batch size)
    "finetune-normal": ("finetune-normal", "--data", 1),
    "finetune-abnormal": ("finetune-abnormal", "--data", 4),
    "train-detector": ("train-detector", "--real", 2),
}


def cytosynth(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cytosynth.jobs.cli", *args], check=True, stdout=subprocess.DEVNULL)


def make_data(out: str, tiles: int, tile_size: int) -> str:
    cytosynth("generate", "--normal-source", "phantom", "--num-tiles", str(tiles), "--tile-size", str(tile_size),
              "--tiles-per-shard", "4", "--steps", "2", "--device", "cpu", "--quiet", "--out", out)
    return out


def job_command(job: str, data: str, out: str, args: argparse.Namespace, zero_stage: int) -> list[str]:
    command, data_option, batch = JOBS[job]
    common = ["--out", out, "--steps", str(args.steps), "--workers", str(args.workers), "--device", args.device,
              "--zero-stage", str(zero_stage), "--batch-size", str(batch), "--checkpoint-every", str(10**6),
              "--sample-every", str(10**6), "--log-every", str(args.steps), "--quiet"]
    if job == "train-detector":
        return [command, data_option, data, "--labels", "abnormal", "--image-size", str(args.tile_size), *common]
    model = ["--preset", args.preset, "--sample-count", "1", "--sample-steps", "2"]
    if job == "finetune-normal":
        model += ["--tile-size", str(args.tile_size)]
    return [command, data_option, data, *model, *common]


def measure(job: str, data: str, args: argparse.Namespace, zero_stage: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        cytosynth(*job_command(job, data, out, args, zero_stage))
        wall = time.perf_counter() - start
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    timed = rows[args.warmup:]
    return {
        "samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 3),
        "gpu_peak_gib": max((r.get("gpu_peak_gib", 0.0) for r in rows), default=0.0) or None,
        "job_wall_s": round(wall, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (bench/gpu.sh's tests parse its planned command with this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs to measure")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--preset", default="sd15", help="architecture of the diffusion jobs (random weights)")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--zero-stages", default="2,0")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    return args


def main() -> None:
    args = parse_args()

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU x{os.cpu_count()}"
    print(f"# finetune | {device} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')} | workers {args.workers}, "
          f"preset {args.preset}, tiles {args.tile_size}, {args.steps} steps ({args.warmup} warm-up)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(os.path.join(tmp, "data"), tiles=max(8, 4 * args.workers), tile_size=args.tile_size)
        print("| job | ZeRO stage | samples/s | peak GPU GiB (rank 0) | job wall s |")
        print("| --- | --- | --- | --- | --- |")
        for job in args.jobs.split(","):
            for stage in (int(s) for s in args.zero_stages.split(",")):
                r = measure(job, data, args, stage)
                print(f"| {job} | {stage} | {r['samples_per_s']} | {r['gpu_peak_gib'] or '-'} | {r['job_wall_s']} |",
                      flush=True)


if __name__ == "__main__":
    main()
