"""Real-to-synthetic at scale: start-up and per-tile cost of the real-tile source, today vs before.

Sets of N real tiles (64x64 PNGs, a smooth pattern plus noise, ~6.4 KB each: small so that 100k
fit the disk and the time; what is measured is per image, not per pixel) as a folder of image
files (kind ``folder``), as a shard set (1,000 tiles per shard) whose markers say nothing of the
images (``shards``), and as a cytosynth output whose markers record each image's byte range as
ShardWriter writes them (``output``), on local disk and on moto S3 over loopback (a moto server in
this process, as tests/conftest.py runs it; its objects are put straight into moto's store, set-up
only).

Each figure comes from a fresh child process running one version of the code: "new" is the
checkout, "old" the `git archive` of --baseline-rev (the code before issue 15 item 1) imported
in its place. Per version and set:

- driver: what a job does before job.json. Old: `RealTileSource(url)` then `check_sizes`
  (`runner.validate_config`). New: `real_tile_index` work (`storage.index_image_set`, alone:
  index_s), the header-size check and writing the index (`storage.write_image_index`).
- replica: what each replica does on start. Old: `RealTileSource(url)` (lists the set; a shard
  set is counted by decoding it). New: reading the job's index (`storage.read_image_index`).
- per tile: mean milliseconds per tile of source calls of 4 tiles (a batch) at BATCHES starting
  points spread evenly over the set (old shard sets: 3 points, each call skips from the start).

An ``output`` set is run by the checkout twice instead, both "new": ``markers`` (the index from
its markers alone) and then, its markers rewritten as a cytosynth before image offsets wrote them
(the same tars), ``headers`` (the index from the tars' headers, the path before); the two indexes
are compared entry for entry (``same_index``).

    python bench/realtiles.py --sizes 1000,10000,100000 --s3-sizes 1000,10000
    python bench/realtiles.py --kinds output --sizes 1000,10000,100000 --s3-sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finalize import CREDENTIALS, baseline_tree, start_moto  # noqa: E402  (the same moto server and baseline checkout)

BASELINE_REV = "e010ad7"  # main before issue 15 item 1: the set decoded on start, batches skipped to
TILE, PER_SHARD, BATCH, BATCHES, OLD_SHARD_BATCHES = 64, 1000, 4, 25, 3
CHILD_TIMEOUT = 420  # seconds: a version that takes longer at a size is reported as not finished


def tile_pngs(count: int = 64) -> list[bytes]:
    """`count` distinct tile PNGs, used in turn (encoding 100k tiles would cost more than the runs)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:TILE, 0:TILE]
    pngs = []
    for seed in range(count):
        noise = np.random.default_rng(seed).integers(0, 8, (TILE, TILE, 3))
        image = (128 + 60 * np.sin((x + seed) / 9)[..., None] * np.cos(y / 7)[..., None] + noise).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs


def set_objects(kind: str, url: str, n: int, pngs: list[bytes]) -> dict[str, bytes]:
    """Every object of a set of n tiles: image files, or shards of PER_SHARD tiles with markers
    (``shards``: markers that only name the shard; ``output``: the markers ShardWriter writes)."""
    import hashlib

    from cytosynth import storage
    from cytosynth.storage.annotations import manifest_row
    from cytosynth.storage.jsonio import json_bytes
    from cytosynth.storage.tars import tar_layout

    if kind == "folder":
        return {storage.join(url, f"tile_{i:07d}.png"): pngs[i % len(pngs)] for i in range(n)}
    objects = {}
    for shard, first in enumerate(range(0, n, PER_SHARD)):
        anns = [storage.normalize_annotation({"seed": i, "source": "real"}, i, TILE, TILE) for i in range(first, min(first + PER_SHARD, n))]
        members = [m for a in anns for m in ((f"{storage.sample_key(a['tile_index'])}.json", json_bytes(a)),
                                             (f"{storage.sample_key(a['tile_index'])}.png", pngs[a["tile_index"] % len(pngs)]))]
        tar, offsets = tar_layout(members)
        rows = [manifest_row(a, shard, "png", len(members[2 * k + 1][1]), offsets[2 * k + 1]) for k, a in enumerate(anns)]
        marker = {"shard": shard, "tiles": len(anns), "cells": {}, "normal_cells": 0, "image_format": "png", "samples": rows,
                  "tar_bytes": len(tar), "tar_sha256": hashlib.sha256(tar).hexdigest()}
        objects[storage.shard_url(url, shard)] = tar
        objects[storage.stats_url(url, shard)] = json_bytes(marker if kind == "output" else {"shard": shard})
    return objects


def markers_before_offsets(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The markers among ``objects`` as a cytosynth wrote them before their rows held image_offset."""
    from cytosynth.storage.jsonio import json_bytes

    markers = {url: json.loads(data) for url, data in objects.items() if url.endswith(".json")}
    for marker in markers.values():
        marker["samples"] = [{k: v for k, v in row.items() if k != "image_offset"} for row in marker["samples"]]
    return {url: json_bytes(marker) for url, marker in markers.items()}


def same_index(first_url: str, second_url: str) -> bool:
    """The two index files hold the same entries (url, offset, length, width, height), in order."""
    from cytosynth import storage

    first, second = storage.read_image_index(first_url), storage.read_image_index(second_url)
    return len(first) == len(second) and all(first.entry(i) == second.entry(i) for i in range(len(first)))


def write_set(objects: dict[str, bytes]) -> None:
    """Local files written plainly; s3:// objects put into moto's store directly."""
    for url, data in objects.items():
        if url.startswith("s3://"):
            from moto.core import DEFAULT_ACCOUNT_ID
            from moto.s3.models import s3_backends

            bucket, _, key = url.removeprefix("s3://").partition("/")
            s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(bucket, key, data)
        else:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            Path(url).write_bytes(data)


def batch_starts(n: int, count: int) -> list[int]:
    return sorted({int(s) for s in [(k + 0.5) * n / count for k in range(count)]} - {n})


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def child_new(url: str, index_url: str) -> dict[str, Any]:
    from cytosynth import storage
    from cytosynth.generation.real_tiles import RealTileSource, check_header_sizes

    def check_and_write(index: storage.ImageIndex) -> int:
        check_header_sizes(index, TILE)
        storage.write_image_index(index, index_url)
        return len(index)

    index, index_s = timed(lambda: storage.index_image_set(url))
    n, rest_s = timed(lambda: check_and_write(index))
    driver_s = index_s + rest_s
    source = RealTileSource(index_url, TILE)
    _, replica_s = timed(lambda: len(source))
    starts = batch_starts(n, BATCHES)
    _, read_s = timed(lambda: [source(range(s, min(s + BATCH, n)), []) for s in starts])
    return {"tiles": n, "driver_s": driver_s, "index_s": index_s, "replica_s": replica_s,
            "ms_per_tile": 1000 * read_s / (BATCH * len(starts))}


def child_old(url: str) -> dict[str, Any]:
    from cytosynth.cluster.synthesis import RealTileSource  # the baseline's layout (before generation/)

    def driver() -> int:
        source = RealTileSource(url)
        source.check_sizes(TILE)
        return len(source)

    n, driver_s = timed(driver)
    source, replica_s = timed(lambda: RealTileSource(url))
    starts = batch_starts(n, OLD_SHARD_BATCHES if source.from_shards else BATCHES)
    _, read_s = timed(lambda: [source(range(s, min(s + BATCH, n)), []) for s in starts])
    return {"tiles": n, "driver_s": driver_s, "replica_s": replica_s, "ms_per_tile": 1000 * read_s / (BATCH * len(starts))}


def run_child(version: str, url: str, index_url: str, env: dict[str, str], baseline: str) -> dict[str, Any] | None:
    env = dict(env)
    if version == "old":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (baseline, env.get("PYTHONPATH")) if p)
    command = [sys.executable, __file__, "--child", version, url, index_url]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode:
        raise SystemExit(f"error: {version} on {url} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    sizes = lambda t: [int(v) for v in t.split(",") if v]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=[1000, 10000, 100000], help="tiles per set on local disk")
    parser.add_argument("--s3-sizes", type=sizes, default=[1000, 10000], help="tiles per set on moto S3")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--old-up-to", type=int, default=100000, help="largest set the old code is run on")
    parser.add_argument("--kinds", type=lambda t: t.split(","), default=["folder", "shards"],
                        help="set kinds: folder, shards (old vs new), output (markers vs headers)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        version, url, index_url = args.child
        print(json.dumps(child_new(url, index_url) if version == "new" else child_old(url)))
        return

    server, endpoint = start_moto()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    import s3fs

    print(f"# realtiles | {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.1f} | "
          f"python {platform.python_version()} | s3fs {s3fs.__version__} | {time.strftime('%Y-%m-%d %H:%M')} | "
          f"baseline {args.baseline_rev} | {TILE}px PNG tiles, {PER_SHARD} per shard", flush=True)
    pngs = tile_pngs()
    print(f"# tile PNG {min(map(len, pngs))}-{max(map(len, pngs))} bytes", flush=True)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    try:
        with tempfile.TemporaryDirectory() as tree, tempfile.TemporaryDirectory() as data:
            baseline = baseline_tree(args.baseline_rev, tree)
            runs = [("local", n) for n in args.sizes] + [("s3", n) for n in args.s3_sizes]
            for store, n in runs:
                for kind in args.kinds:
                    if store == "s3":
                        bucket = f"bench-real-{kind}-{n}"
                        fs.mkdir(bucket)
                        root = f"s3://{bucket}"
                    else:
                        root = f"{data}/{kind}-{n}"
                    url = f"{root}/real"
                    objects, setup_s = timed(lambda: set_objects(kind, url, n, pngs))
                    setup_s += timed(lambda: write_set(objects))[1]
                    versions = ["markers", "headers"] if kind == "output" else ["old", "new"][n > args.old_up_to:]
                    for version in versions:
                        if version == "headers":  # the same tars, the markers an older cytosynth wrote
                            write_set(markers_before_offsets(objects))
                        index_url = f"{root}/out/{version}/real_index.parquet"
                        result = run_child("old" if version == "old" else "new", url, index_url, env, baseline)
                        row = {"store": store, "kind": kind, "tiles": n, "version": version, "setup_s": round(setup_s, 1)}
                        if result is None:
                            row["not_finished_in_s"] = CHILD_TIMEOUT
                        else:
                            row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
                        if version == "headers" and result is not None:
                            row["same_index"] = same_index(f"{root}/out/markers/real_index.parquet", index_url)
                        print(json.dumps(row), flush=True)
                    if store == "s3":
                        fs.rm(bucket, recursive=True)
                    else:
                        subprocess.run(["rm", "-rf", root], check=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
