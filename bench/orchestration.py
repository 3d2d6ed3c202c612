"""Orchestration efficiency of `cytosynth generate` on Ray, with simulated GPU replicas.

A simulated replica is the product's own ShardReplica and ShardMaker (real shards, PNG
encoding, the commit protocol, per-shard stats) whose synthesis is a fixed sleep per tile and
whose tiles are 32x32, so what is measured is the scheduler, Ray and the commit path, not models.

Throughput: the ideal is replicas / latency. Measured is the sum over replicas of each one's
rate between its first and its last commit: what the pool delivers while every replica is up,
with actor start-up (replicas load one by one) and the final drain left out; the job's wall time
and when the last replica first committed are reported beside it. `slowest_replica` is the
efficiency of the least-fed replica.

Driver memory: jobs planning 10k to 1M tiles on the same pool run until a fixed number of shards
is committed; each runs in a fresh process, which reports its peak RSS and the peak of Python
allocations (tracemalloc) while the job ran. Flat means the driver holds no per-tile state.

    python bench/orchestration.py throughput --replicas 1,8,32,64
    python bench/orchestration.py memory --planned 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from cytosynth.cluster.distributed import run_distributed
from cytosynth.generation.generate_config import GenerateConfig
from cytosynth.synth.settings import SynthesisSettings
from cytosynth.generation.runner import Runtime
from cytosynth.generation.shard_maker import ShardMaker

TILE = 32


@dataclass
class SimulatedSample:
    tile_index: int
    image: np.ndarray
    annotation: dict[str, Any]


def simulated_synthesize(latency: float, batches: Iterable[Sequence[int]], seconds: MutableMapping[str, float],
                         idle: MutableMapping[str, float]) -> Iterator[list[SimulatedSample]]:
    """`latency` seconds of 'GPU work' per tile, then small tiles with one box each."""
    image = np.full((TILE, TILE, 3), 200, np.uint8)
    for tiles in batches:
        time.sleep(latency * len(tiles))
        seconds["stage1"] += latency * len(tiles)
        yield [SimulatedSample(i, image, {"seed": i, "boxes": [[4, 4, 12, 12]], "labels": ["LSIL"], "source": "synthetic"})
               for i in tiles]


def simulated_worker(config: GenerateConfig, latency: float, *, device: str, identity: dict[str, Any]) -> ShardMaker:
    return ShardMaker(config, functools.partial(simulated_synthesize, latency), {"models": "simulated"},
                       batch_size=4, identity=identity)


def run_job(out: str, num_tiles: int, tiles_per_shard: int, replicas: int, latency: float,
            stop_after: int | None = None) -> tuple[list[dict[str, Any]], float, float]:
    """One simulated job on `replicas` replicas: the committed shards' stats, the job's start
    (epoch seconds, like the stats' timestamps) and its wall seconds.
    With `stop_after`, the job is abandoned once that many shards are committed."""
    config = GenerateConfig(out=out, num_tiles=num_tiles, tiles_per_shard=tiles_per_shard, normal_source="phantom",
                            synthesis=SynthesisSettings(tile_size=256))
    shards: list[dict[str, Any]] = []

    def on_shard(stats: dict[str, Any]) -> None:
        shards.append({k: stats[k] for k in ("replica", "tiles", "finished_at")})
        if stop_after is not None and len(shards) >= stop_after:
            raise EnoughShards

    started_at, start = time.time(), time.perf_counter()
    try:
        run_distributed(config, Runtime(device="cpu", progress=False), workers=replicas,
                        make_shard_maker=functools.partial(simulated_worker, config, latency), on_shard=on_shard)
    except EnoughShards:
        pass
    return shards, started_at, time.perf_counter() - start


class EnoughShards(Exception):
    pass


def replica_rates(shards: list[dict[str, Any]]) -> list[float]:
    """Tiles/s of each replica between its first and its last commit (replicas with 2+ shards)."""
    by_replica: dict[str, list[dict[str, Any]]] = {}
    for s in shards:
        by_replica.setdefault(s["replica"], []).append(s)
    rates = []
    for own in by_replica.values():
        own.sort(key=lambda s: s["finished_at"])
        if len(own) > 1:
            rates.append(sum(s["tiles"] for s in own[1:]) / (own[-1]["finished_at"] - own[0]["finished_at"]))
    return rates


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for replicas in args.replicas:
        shards_total = replicas * args.shards_per_replica
        with tempfile.TemporaryDirectory() as out:
            shards, started_at, wall = run_job(out, shards_total * args.tiles_per_shard, args.tiles_per_shard, replicas, args.latency)
        rates = replica_rates(shards)
        measured, ideal = sum(rates), replicas / args.latency
        all_up = max(min(s["finished_at"] for s in shards if s["replica"] == w) for w in {s["replica"] for s in shards})
        rows.append({"replicas": replicas, "ideal_tiles_per_s": round(ideal, 2), "tiles_per_s": round(measured, 2),
                     "efficiency": round(measured / ideal, 4), "slowest_replica": round(min(rates) * args.latency, 4),
                     "replicas_measured": len(rates), "job_wall_s": round(wall, 1),
                     "all_replicas_committed_s": round(all_up - started_at, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_of_one(planned: int, args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: a job planning `planned` tiles, stopped after a fixed shard count."""
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as out:
        shards, _, wall = run_job(out, planned, args.tiles_per_shard, args.memory_replicas, args.latency,
                               stop_after=args.memory_shards)
    _, peak = tracemalloc.get_traced_memory()
    return {"planned_tiles": planned, "planned_shards": -(-planned // args.tiles_per_shard), "committed_shards": len(shards),
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_python_peak_mib": round(peak / 2**20, 2), "wall_s": round(wall, 1)}


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for planned in args.planned:
        command = [sys.executable, __file__, "memory-one", str(planned), "--tiles-per-shard", str(args.tiles_per_shard),
                   "--latency", str(args.latency), "--memory-replicas", str(args.memory_replicas),
                   "--memory-shards", str(args.memory_shards)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "memory", "memory-one"])
    parser.add_argument("planned_one", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=numbers, default=[1, 8, 32, 64])
    parser.add_argument("--latency", type=float, default=0.25, help="simulated seconds of GPU work per tile")
    parser.add_argument("--tiles-per-shard", type=int, default=8)
    parser.add_argument("--shards-per-replica", type=int, default=32)
    parser.add_argument("--planned", type=numbers, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--memory-replicas", type=int, default=8)
    parser.add_argument("--memory-shards", type=int, default=200, help="shards committed per memory run")
    args = parser.parse_args()
    if args.mode == "memory-one":
        print(json.dumps(memory_of_one(args.planned_one, args)))
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("mode", "planned_one")}
    print(f"# {args.mode} | {platform.node()} {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPUs | ray {ray.__version__} | python {platform.python_version()} | "
          f"{time.strftime('%Y-%m-%d')} | {json.dumps(settings)}", flush=True)
    (throughput if args.mode == "throughput" else memory)(args)


if __name__ == "__main__":
    main()
