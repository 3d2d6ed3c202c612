"""Tiles/s per GPU of a cytosynth replica at the paper's settings, against the compute bound and
against plain diffusers pipelines, all measured in one run (issue 6).

In one process, on one device:

1. matmul peak: the best TFLOP/s of large square matmuls in the models' dtype;
2. FLOPs, counted with torch's FlopCounterMode on the models themselves: one UNet call at the tile
   latent and one ACS call at the crop latent (x2 for CFG, x steps), the VAE decode of a tile,
   the VAE encode + decode of a crop;
3. the replica: `load_shard_maker` (what `cytosynth generate` and every Ray replica run), whole
   shards of `--batch-size` tiles made and committed to a local folder, after one warm-up shard;
   tiles/s, per-stage seconds, achieved TFLOP/s (counted FLOPs of the tiles and cells it made) and
   that as a fraction of the matmul peak, peak GPU memory;
4. the baseline a user would write with diffusers: `StableDiffusionPipeline` one tile at a time and
   `StableDiffusionGLIGENPipeline` (its 9-channel inpainting mode) one cell at a time, on the same
   weights and dtype; its seconds per tile are one tile plus the replica's mean cells per tile of
   cells. It skips detection, paste-back and encoding, which only favours it.

Full-size SD1.5 with random weights costs exactly what real weights cost:

    python bench/throughput.py --preset sd15 --device cuda --batch-size 4 --tiles 16
    python bench/throughput.py --preset tiny --device cpu --tile-size 256 --tiles 4 --batch-size 2   # smoke

The results are printed as a Markdown section for bench/RESULTS.md (`--append` writes it there).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cytosynth.generation.generate_config import GenerateConfig, JobLayout
from cytosynth.generation.synthesis import load_models, load_shard_maker, model_dtype
from cytosynth.jobs.common import quiet_libraries
from cytosynth.synth import ABNORMAL_CLASSES, SynthesisSettings, draw_phantom_tile
from cytosynth.synth.abnormal import CELL_PROMPT, AbnormalCellSynthesizer
from cytosynth.synth.cell_crops import CROP_SIZE
from cytosynth.synth.normal import NORMAL_PROMPT, NormalTileGenerator

RESULTS = Path(__file__).with_name("RESULTS.md")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best TFLOP/s of an n x n x n matmul."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (cuBLAS heuristics, lazy init)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def counted(fn) -> float:
    """FLOPs of one call of `fn` (matmuls and convolutions, as FlopCounterMode counts)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def per_call_flops(run, steps: int) -> float:
    """FLOPs of `run(steps)` from two counted calls: a 1-step and a 2-step one differ by one step."""
    one, two = counted(lambda: run(1)), counted(lambda: run(2))
    return one + (steps - 1) * (two - one)


def work_flops(bundle, tile_size: int, steps: int, guidance: float) -> dict[str, float]:
    """FLOPs of one stage-1 tile (UNet x 2 for CFG x steps + VAE decode) and of one edited cell
    (VAE encode + ACS x 2 x steps + VAE decode), counted on the product's own sampling code.
    Prompts are encoded once per job, outside the count, as in the replica."""
    components = (bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.scheduler)
    tiles = {k: NormalTileGenerator(bundle.unet, *components, tile_size=tile_size, steps=k, guidance=guidance)
             for k in (1, 2)}
    cells = {k: AbnormalCellSynthesizer(bundle.acs_unet, *components, steps=k, guidance=guidance) for k in (1, 2)}
    crop, box = draw_phantom_tile(0, CROP_SIZE)[0][None], np.array([[96, 96, 160, 160]])
    return {"tile": per_call_flops(lambda k: tiles[k]([0]), steps),
            "cell": per_call_flops(lambda k: cells[k](crop, box, ["LSIL"], [0]), steps)}


def time_replica(config: GenerateConfig, device: str, batch_size: int, precision: str, shards: int) -> dict:
    """The replica making whole shards of `batch_size` tiles: one warm-up shard, then `shards` timed."""
    worker = load_shard_maker(config, device, batch_size, precision=precision)
    layout = JobLayout(config.num_tiles, config.tiles_per_shard)
    worker.run(0, layout)  # warm-up: lazy CUDA init, cuDNN/cuBLAS heuristics
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stages, cells = Counter(), 0
    sync(device)
    start = time.perf_counter()
    for shard in range(1, shards + 1):
        stats = worker.run(shard, layout)
        stages.update(stats["stage_seconds"])
        cells += sum(stats["cells"].values())
    sync(device)
    seconds = time.perf_counter() - start
    tiles = shards * config.tiles_per_shard
    return {"tiles": tiles, "cells": cells, "seconds": seconds, "stage_seconds": dict(stages),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def time_baseline(bundle, config: GenerateConfig, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of one tile (StableDiffusionPipeline) and one cell (GLIGEN inpainting) on
    `bundle`'s models (already on `device` in the replica's dtype)."""
    from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionPipeline
    from PIL import Image

    parts = {"vae": bundle.vae, "text_encoder": bundle.text_encoder, "tokenizer": bundle.tokenizer,
             "scheduler": bundle.scheduler, "safety_checker": None, "feature_extractor": None,
             "requires_safety_checker": False}
    tile_pipe = StableDiffusionPipeline(unet=bundle.unet, **parts)
    cell_pipe = StableDiffusionGLIGENPipeline(unet=bundle.acs_unet, **parts)
    bundle.vae.register_to_config(sample_size=CROP_SIZE)  # GLIGEN resizes its input image to this
    for pipe in (tile_pipe, cell_pipe):
        pipe.set_progress_bar_config(disable=True)
    crop = Image.fromarray(draw_phantom_tile(0, CROP_SIZE)[0])
    settings = config.synthesis
    s = settings.tile_size

    def tile() -> None:
        tile_pipe(NORMAL_PROMPT, height=s, width=s, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                  output_type="np")

    def cell() -> None:
        label = ABNORMAL_CLASSES[0]
        cell_pipe(CELL_PROMPT.format(cls=label), height=CROP_SIZE, width=CROP_SIZE,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance, gligen_phrases=[label],
                  gligen_boxes=[[0.375, 0.375, 0.625, 0.625]], gligen_inpaint_image=crop,
                  gligen_scheduled_sampling_beta=1.0, output_type="np")

    def median_seconds(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"tile": median_seconds(tile), "cell": median_seconds(cell)}


def report(args: argparse.Namespace, peak: float, flops: dict, replica: dict, baseline: dict) -> str:
    per_tile_cells = replica["cells"] / replica["tiles"]
    tiles_per_s = replica["tiles"] / replica["seconds"]
    achieved = (replica["tiles"] * flops["tile"] + replica["cells"] * flops["cell"]) / replica["seconds"] / 1e12
    bound = peak * 1e12 / (flops["tile"] + per_tile_cells * flops["cell"])
    baseline_tile_s = baseline["tile"] + per_tile_cells * baseline["cell"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU x{os.cpu_count()}"
    import diffusers

    stage_line = ", ".join(f"{k} {v / replica['tiles']:.3f}" for k, v in replica["stage_seconds"].items())
    memory = f"{replica['peak_gib']:.2f} GiB" if replica["peak_gib"] is not None else "- (CPU)"
    return "\n".join([
        f"### {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        f"`python bench/throughput.py {' '.join(args.argv)}` — preset {args.preset} (random weights), "
        f"{args.tile_size}x{args.tile_size}, DDIM {args.steps}, CFG {args.guidance}, cells {args.cells}, "
        f"precision {args.precision}, batch {args.batch_size}, {replica['tiles']} timed tiles "
        f"({per_tile_cells:.2f} cells per tile).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| matmul peak ({args.dtype_name}) | {peak:.1f} TFLOP/s |",
        f"| counted FLOPs per tile (stage 1) / per edited cell | {flops['tile'] / 1e12:.3f} / {flops['cell'] / 1e12:.3f} TFLOP |",
        f"| compute bound at this cell count | {bound:.3f} tiles/s |",
        f"| cytosynth replica | {tiles_per_s:.3f} tiles/s ({achieved:.2f} TFLOP/s, {achieved / peak:.1%} of peak) |",
        f"| plain diffusers (one tile, then one cell at a time) | {1 / baseline_tile_s:.3f} tiles/s "
        f"(tile {baseline['tile']:.2f} s, cell {baseline['cell']:.2f} s) |",
        f"| replica / baseline | {tiles_per_s * baseline_tile_s:.2f}x |",
        f"| replica seconds per tile by stage | {stage_line} |",
        f"| peak GPU memory (replica) | {memory} |",
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (bench/gpu.sh's tests parse its planned command with this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cells", default="1-8")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per shard and per model call")
    parser.add_argument("--tiles", type=int, default=16, help="timed tiles (whole shards)")
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--append", action="store_true", help="append the section to bench/RESULTS.md")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    quiet_libraries()
    args.argv = [a for a in sys.argv[1:] if a != "--append"]
    dtype = model_dtype(args.precision, args.device)
    args.dtype_name = str(dtype).removeprefix("torch.")
    shards = max(1, args.tiles // args.batch_size)
    low, high = (int(v) for v in args.cells.split("-"))

    with tempfile.TemporaryDirectory() as out:
        config = GenerateConfig(out=out, num_tiles=(shards + 1) * args.batch_size, preset=args.preset,
                                random_weights=True, tiles_per_shard=args.batch_size,
                                synthesis=SynthesisSettings(args.tile_size, args.steps, args.guidance, (low, high)))
        peak = matmul_peak(args.device, dtype, args.matmul_size)
        replica = time_replica(config, args.device, args.batch_size, args.precision, shards)
    # One copy of the models for the FLOP count and the baseline (the replica's copy is gone).
    bundle = load_models(config).to(args.device, dtype)
    flops = work_flops(bundle, args.tile_size, args.steps, args.guidance)
    baseline = time_baseline(bundle, config, args.device, args.baseline_repeats)
    section = report(args, peak, flops, replica, baseline)
    print(section)
    if args.append:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + section)


if __name__ == "__main__":
    main()
