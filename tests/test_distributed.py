"""Distributed generation on local Ray (DESIGN.md section 7; invariants 1, 3, 5, 6).

One Ray session for the module (ray.init is slow); every job runs the same tiny config, so the
outputs can be compared byte for byte: 1 replica (the reference), 3 replicas on moto S3, and 3
replicas with one killed by kill -9 mid-job.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from cytosynth import storage  # noqa: E402
from cytosynth.cluster.distributed import pool_changes, run_distributed  # noqa: E402
from cytosynth.cluster.runner import Runtime  # noqa: E402
from cytosynth.cluster.job import GenerateConfig  # noqa: E402
from cytosynth.jobs.cli import main  # noqa: E402

NUM_TILES = 8
RUNTIME = Runtime(device="cpu", batch_size=2, progress=False)


def config(out: str) -> GenerateConfig:
    return GenerateConfig(
        out=out, num_tiles=NUM_TILES, tiles_per_shard=1, normal_source="phantom", steps=2, tile_size=256, seed=7
    )


@pytest.fixture(scope="module")
def ray_session():
    # Two fake GPUs: replicas can reserve GPU resources while computing on CPU.
    ray.init(
        address="local", num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False,
        logging_level="ERROR", object_store_memory=150 * 1024**2,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> dict[str, bytes]:
    """The dataset made by one replica: shard name -> tar bytes."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    summary = run_distributed(config(out), RUNTIME, workers=1)
    assert summary["tiles"] == NUM_TILES
    return shard_bytes(out)


def shard_bytes(out: str) -> dict[str, bytes]:
    return {url.rsplit("/", 1)[-1]: storage.get_bytes(url) for url in storage.shard_urls(out)}


def check_exactly_once(out: str) -> None:
    keys = [s["tile_index"] for s in storage.read_samples(out)]
    assert sorted(keys) == list(range(NUM_TILES))
    manifest = storage.read_manifest(out).to_pylist()
    assert sorted(int(row["key"]) for row in manifest) == list(range(NUM_TILES))
    assert storage.is_complete(out)


def test_pool_of_fake_gpu_replicas_computing_on_cpu_writes_the_reference_dataset_to_s3(reference, s3_bucket):
    out = s3_bucket + "/job"
    summary = run_distributed(config(out), RUNTIME, workers=(1, 3), gpus_per_replica=0.5)
    assert summary["tiles"] == NUM_TILES and summary["shards"] == NUM_TILES
    check_exactly_once(out)
    stats = list(storage.iter_shard_stats(out))
    # Each replica reserved half of one of the session's 2 (fake) GPUs but computed on the CPU.
    assert all(s["gpus"] and s["device"] == "cpu" for s in stats)
    workers = {s["worker"] for s in stats}
    assert 1 <= len(workers) <= 3 and all(len(w) > 8 and w != "local" for w in workers)  # Ray actor ids
    assert all(s["node"] == ray.get_runtime_context().get_node_id() and s["attempt"] == 1 for s in stats)
    assert set(stats[0]["stage_seconds"]) == {"stage1", "detection", "stage2", "paste_back", "encode"}
    assert summary["this_run"]["shards"] == NUM_TILES and summary["this_run"]["stage_seconds"]["upload"] > 0
    # Invariant 1: replica count (and backend) does not change the data; on CPU not one byte.
    assert shard_bytes(out) == reference


@pytest.mark.parametrize(
    "waiting, replicas, starting, idle, expected",
    [
        (10, 0, 0, 0, (4, 0, 0)),  # shards wait, nothing started yet: up to MAX
        (10, 1, 1, 0, (3, 0, 0)),  # the replica still starting will take one of them
        (10, 4, 0, 0, (0, 0, 0)),  # at MAX: shards wait for a slot
        (2, 3, 2, 0, (0, 0, 0)),  # as many starting as waiting: nothing to change
        (1, 3, 2, 0, (0, 1, 0)),  # fewer shards than starting replicas: release the surplus
        (0, 3, 0, 2, (0, 0, 2)),  # nothing waits: idle replicas go (their GPUs, then nodes, free up)
    ],
)
def test_pool_grows_while_shards_wait_and_releases_replicas_with_no_shard_left(waiting, replicas, starting, idle, expected):
    assert pool_changes(waiting, replicas, starting, idle, max_size=4) == expected


def test_replica_killed_mid_job(reference, tmp_path):
    out = str(tmp_path / "out")
    killed: list[int] = []

    def kill_one_after_first_commit() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not storage.committed_shards(out):
            time.sleep(0.05)
        while time.time() < deadline and not killed:
            busy = [p for p in _replica_processes() if ".run" in p[1]]
            if busy:
                pid = busy[0][0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_after_first_commit, daemon=True)
    killer.start()
    summary = run_distributed(config(out), RUNTIME, workers=3)
    killer.join(timeout=5)
    assert killed, "no replica was running a shard after the first commit"
    assert summary["tiles"] == NUM_TILES
    check_exactly_once(out)
    assert shard_bytes(out) == reference


def _replica_processes() -> list[tuple[int, str]]:
    """(pid, title) of this user's ShardReplica actor processes (Ray titles them ray::<Class>.<method>)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::ShardReplica") and proc.info["uids"].real == os.getuid():
            found.append((proc.info["pid"], " ".join(cmdline)))
    return found


def test_unreachable_ray_address(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--out", str(out), "--num-tiles", "2", "--normal-source", "phantom",
                 "--steps", "2", "--tile-size", "256", "--ray-address", "127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "127.0.0.1:1" in err[0]
    assert not out.exists()  # nothing written
