"""Replica throughput, pipelined against serial, with a simulated GPU and the real CPU stages
(issue 15, item 4).

The replica is the product's own: `ShardMaker` fed by `generation.synthesis.pipelined_synthesis`
over a `TileSynthesizer` with the real classical detector, cell selection, paste-back and PNG
encoding on real-size phantom tiles (drawn once, before timing). Only the two diffusion stages
are simulated: a sleep of `--stage1` seconds per tile and `--stage2` seconds per edited cell (a
sleep releases the GIL as a CUDA synchronize does), stage 2 handing its crops back unchanged.
Two shards are in flight at once, as on a Ray replica (IN_FLIGHT_PER_REPLICA).

Serial is pipeline depth 0 (every stage in series on the replica's thread, the order before
this change); pipelined is the default depth. Both run in the same process, alternating, and
must write the same tars. The hidden fraction is the wall time the pipeline saved over the CPU
stages' busy time in series: (serial s - pipelined s) / (serial detection + paste-back s).

    python bench/pipeline.py --stage1 0.5 --stage2 0.05 --tiles 64      # one setting
    python bench/pipeline.py --settings 0.5:0.05,0.2:0.02 --append     # several, into RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cytosynth.generation.generate_config import GenerateConfig, JobLayout
from cytosynth.generation.synthesis import pipelined_synthesis
from cytosynth.generation.shard_maker import ShardMaker
from cytosynth.synth import ClassicalCellDetector, SynthesisSettings, TileSynthesizer, draw_phantom_tile
from cytosynth.synth.schedule import PIPELINE_DEPTH

RESULTS = Path(__file__).with_name("RESULTS.md")
TILE = 1024
POOL = 8  # distinct phantom tiles, cycled by tile index


class SimulatedStage1:
    """Normal tiles: `seconds` of 'GPU' per tile, then phantom tile index % POOL."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.pool = seconds, [draw_phantom_tile(i, TILE)[0] for i in range(POOL)]

    def __call__(self, indices, seeds):
        time.sleep(self.seconds * len(indices))
        return [self.pool[i % POOL] for i in indices]


class SimulatedStage2:
    """The editor: `seconds` of 'GPU' per cell; the crops come back as they went in."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, crops, boxes, labels, seeds):
        time.sleep(self.seconds * len(crops))
        return np.array(crops, copy=True)


def replica(out: str, stage1: SimulatedStage1, stage2: float, depth: int, tiles_per_shard: int, batch: int) -> ShardMaker:
    config = GenerateConfig(out=out, num_tiles=1 << 20, tiles_per_shard=tiles_per_shard,
                            synthesis=SynthesisSettings(TILE))
    synthesizer = TileSynthesizer(stage1, ClassicalCellDetector(), SimulatedStage2(stage2), SynthesisSettings(TILE))
    return ShardMaker(config, pipelined_synthesis(synthesizer, 0, "simulated", depth), {"models": "simulated"}, batch)


def timed_shards(worker: ShardMaker, shards: range, layout: JobLayout) -> dict:
    """Wall seconds of `shards`, two in flight as on a Ray replica, and their summed stats."""
    busy, idle, cells = Counter(), Counter(), 0
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for stats in pool.map(lambda s: worker.run(s, layout), shards):
            busy.update(stats["stage_seconds"])
            idle.update(stats["idle_seconds"])
            cells += sum(stats["cells"].values())
    return {"seconds": time.perf_counter() - start, "busy": busy, "idle": idle, "cells": cells}


def tar_hashes(out: str) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out, "shards").glob("*.tar"))]


def run_setting(stage1_s: float, stage2_s: float, args: argparse.Namespace) -> dict:
    """Serial and pipelined, alternating `--repeats` times; medians, and the tars compared."""
    stage1 = SimulatedStage1(stage1_s)
    layout = JobLayout(1 << 20, args.tiles_per_shard)
    shards = range(1, 1 + args.tiles // args.tiles_per_shard)
    runs: dict[int, list[dict]] = {0: [], PIPELINE_DEPTH: []}
    hashes: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for depth in runs:
            with tempfile.TemporaryDirectory() as out:
                worker = replica(out, stage1, stage2_s, depth, args.tiles_per_shard, args.batch_size)
                worker.run(0, JobLayout(args.batch_size, args.tiles_per_shard))  # warm-up (one batch): lazy imports
                runs[depth].append(timed_shards(worker, shards, layout))
                hashes[depth] = tar_hashes(out)
    return {"stage1": stage1_s, "stage2": stage2_s, "tiles": len(shards) * args.tiles_per_shard,
            "serial": median_run(runs[0]), "pipelined": median_run(runs[PIPELINE_DEPTH]),
            "same_tars": hashes[0] == hashes[PIPELINE_DEPTH]}


def median_run(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in runs)))


def row(result: dict) -> str:
    n, serial, piped = result["tiles"], result["serial"], result["pipelined"]
    cpu = serial["busy"]["detection"] + serial["busy"]["paste_back"]
    hidden = (serial["seconds"] - piped["seconds"]) / cpu
    return (f"| {result['stage1']:.2f} s + {result['stage2']:.2f} s/cell | {serial['cells'] / n:.2f} "
            f"| {n / serial['seconds']:.3f} | {n / piped['seconds']:.3f} | {serial['seconds'] / piped['seconds']:.2f}x "
            f"| {serial['busy']['detection'] / n:.3f} / {piped['busy']['detection'] / n:.3f} "
            f"| {cpu / n:.3f} | {piped['idle']['stage2'] / n:.3f} | {hidden:.0%} "
            f"| {'yes' if result['same_tars'] else 'NO'} |")


def report(args: argparse.Namespace, results: list[dict], load: tuple[float, float]) -> str:
    return "\n".join([
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} CPU x{os.cpu_count()} "
        f"(load average {load[0]:.1f} before, {load[1]:.1f} after), Python {platform.python_version()}, "
        "simulated GPU",
        "",
        f"`python bench/pipeline.py {' '.join(args.argv)}` — {TILE}x{TILE} phantom tiles, classical detector, "
        f"batch {args.batch_size}, {args.tiles_per_shard} tiles per shard (two shards in flight), "
        f"{args.tiles} timed tiles per run after a one-batch warm-up, the median of {args.repeats} alternating runs per mode.",
        "",
        "| simulated GPU: stage 1 per tile + stage 2 per cell | cells per tile | serial tiles/s | pipelined tiles/s "
        "| speed-up | detection s per tile (serial / pipelined) | CPU stages s per tile, serial | device wait for "
        "detection s per tile, pipelined | CPU stage time hidden | same tars |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *map(row, results),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.5:0.05",
                        help="simulated GPU seconds, STAGE1_PER_TILE:STAGE2_PER_CELL, comma-separated")
    parser.add_argument("--tiles", type=int, default=64, help="timed tiles per run (whole shards)")
    parser.add_argument("--tiles-per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (odd: a median run)")
    parser.add_argument("--append", action="store_true", help="append the section to bench/RESULTS.md")
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:] if a != "--append"]
    before = os.getloadavg()[0]
    results = [run_setting(*map(float, s.split(":")), args) for s in args.settings.split(",")]
    section = report(args, results, (before, os.getloadavg()[0]))
    print(section)
    if args.append:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + section)


if __name__ == "__main__":
    main()
