"""Finalize time and memory at 1k-50k shards on S3 (moto), serial code before issue 15 vs now.

A moto S3 server runs on 127.0.0.1 in this process, as tests/conftest.py runs it; every measured
finalize runs in a child process and reaches it over HTTP. Each size gets an output holding job.json, two real shards (8 tiles of
64x64 each, what the preview reads) and synthetic shards 2..N-1: a marker that is shard 0's marker
with its shard and tile numbers rewritten (8 manifest rows, ~3 KB) and an empty object for its tar
(finalize lists tars but opens only the two the preview shows).

Each finalize runs `generation.runner.finalize_job` in a fresh process: "serial" is the code as it
was before this change (`git archive` of --baseline-rev, imported in place of the checkout),
"parallel" is the checkout. Between runs, the manifest, preview and `_SUCCESS` are deleted; the
two runs' manifests are compared byte for byte. Peak RSS is the child's ru_maxrss; "+finalize" is
that minus its RSS just before finalize_job (after the imports).

    python bench/finalize.py --shards 1000,10000,50000 [--serial-up-to 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "00734ea"  # main just before issue 15: serial marker GETs, manifest in one buffer
PACKAGES = ("synth", "storage", "cluster", "jobs")
TILES_PER_SHARD = 8  # 125,000 shards per million tiles, the scale issue 15 names
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
               "NO_PROXY": "127.0.0.1,localhost"}


def start_moto() -> tuple[Any, str]:
    """A moto S3 server in this process's threads (the measured finalizes run in child processes)."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def put_directly(out: str, objects: dict[str, bytes]) -> None:
    """Put objects straight into the moto server's store (set-up only: 100k HTTP PUTs to moto
    take longer than the finalizes being measured)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for url, data in objects.items():
        bucket, _, key = url.removeprefix("s3://").partition("/")
        backend.put_object(bucket, key, data)


def renumbered(template: dict[str, Any], shard: int) -> bytes:
    """Shard 0's marker as shard `shard`'s: same rows, tile and shard numbers moved."""
    from cytosynth.storage import sample_key
    from cytosynth.storage.jsonio import json_bytes

    samples = []
    for row in template["samples"]:
        tile = shard * TILES_PER_SHARD + row["tile_index"]
        samples.append({**row, "tile_index": tile, "key": sample_key(tile), "shard": shard, "seed": 1000 + tile})
    return json_bytes({**template, "shard": shard, "samples": samples})


def populate(out: str, shards: int) -> None:
    """job.json, shards 0 and 1 real, the rest synthetic markers and empty tars (see the docstring)."""
    import numpy as np

    from cytosynth import storage

    storage.write_job_json(out, {"bench": "finalize", "tiles_per_shard": TILES_PER_SHARD})
    rng = np.random.default_rng(0)
    template = None
    for shard in range(min(2, shards)):
        writer = storage.ShardWriter(out, shard)
        for t in range(TILES_PER_SHARD):
            tile = shard * TILES_PER_SHARD + t
            writer.add(tile, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                       {"tile_index": tile, "seed": 1000 + tile, "width": 64, "height": 64, "boxes": [[4, 6, 20, 30]],
                        "labels": ["ASC-US"], "normal_boxes": [[30, 30, 40, 44]], "source": "synthetic"})
        stats = writer.commit({"replica": "bench"})
        template = template or stats
    for shard in range(2, shards):
        put_directly(out, {storage.stats_url(out, shard): renumbered(template, shard), storage.shard_url(out, shard): b""})


def baseline_tree(rev: str, into: str) -> str:
    """The packages at `rev`, laid out as an importable `cytosynth` namespace under `into`."""
    root = Path(into, "cytosynth")
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *PACKAGES], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return into


def child(out: str, shards: int) -> dict[str, Any]:
    """In this fresh process: finalize the output, report time and memory."""
    from cytosynth import storage
    # The baseline's layout first: its tree comes first on the path, and `cytosynth` is a
    # namespace that would find the checkout's generation/ too.
    try:
        from cytosynth.cluster.job import GenerateConfig, JobLayout
        from cytosynth.cluster.runner import finalize_job
    except ImportError:  # the checkout
        from cytosynth.generation.generate_config import GenerateConfig, JobLayout
        from cytosynth.generation.runner import finalize_job

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    summary = finalize_job(GenerateConfig(out=out, tiles_per_shard=TILES_PER_SHARD),
                           JobLayout(shards * TILES_PER_SHARD, TILES_PER_SHARD), 0.0)
    seconds = time.perf_counter() - start
    manifest = storage.get_bytes(storage.join(out, "manifest.parquet"))
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mib": round(rss_before, 1), "tiles": summary["tiles"], "manifest_mib": round(len(manifest) / 2**20, 2),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "code": storage.__file__}


def run_child(out: str, shards: int, env: dict[str, str], pythonpath: str | None) -> dict[str, Any]:
    env = dict(env)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, __file__, "--child", out, "--shards", str(shards)],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: finalize of {out} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def reset(out: str) -> None:
    from cytosynth import storage

    fs, path = storage.filesystem(out)
    for name in ("manifest.parquet", "preview.png", "_SUCCESS"):
        if fs.exists(f"{path}/{name}"):
            fs.rm_file(f"{path}/{name}")
    fs.invalidate_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=lambda t: [int(v) for v in t.split(",")], default=[1000, 10000, 50000])
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the serial code")
    parser.add_argument("--serial-up-to", type=int, default=10**9, metavar="SHARDS",
                        help="largest output the serial code is run on (it takes about an hour at 50k shards)")
    parser.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shards[0])))
        return

    server, endpoint = start_moto()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    import s3fs

    from cytosynth.storage.urls import READ_CONCURRENCY

    print(f"# finalize | {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
          f"load {os.getloadavg()[0]:.1f} | python {platform.python_version()} | s3fs {s3fs.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M')} | baseline {args.baseline_rev} | concurrency {READ_CONCURRENCY} | "
          f"{TILES_PER_SHARD} tiles per shard", flush=True)
    try:
        with tempfile.TemporaryDirectory() as tree:
            baseline = baseline_tree(args.baseline_rev, tree)
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
            for shards in args.shards:
                bucket = f"bench-finalize-{shards}"
                fs.mkdir(bucket)
                out = f"s3://{bucket}/out"
                start = time.perf_counter()
                populate(out, shards)
                print(f"# {shards} shards written in {time.perf_counter() - start:.0f} s", flush=True)
                runs = {}
                variants = (("serial", baseline), ("parallel", None)) if shards <= args.serial_up_to else (("parallel", None),)
                for variant, path in variants:
                    reset(out)
                    runs[variant] = run_child(out, shards, env, path)
                    print(json.dumps({"shards": shards, "variant": variant, **runs[variant]}), flush=True)
                if "serial" in runs:
                    same = runs["serial"]["manifest_sha256"] == runs["parallel"]["manifest_sha256"]
                    speedup = round(runs["serial"]["seconds"] / runs["parallel"]["seconds"], 2)
                    print(json.dumps({"shards": shards, "speedup": speedup, "same_manifest_bytes": same}), flush=True)
                fs.rm(bucket, recursive=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
