"""Distributed generation on local Ray (docs/design.md §2; invariants 1, 3-6).

One Ray session for the module (ray.init is slow); every job runs the same tiny config, so the
outputs can be compared byte for byte with the reference made by 1 replica: a pool of up to 3
fake-GPU replicas on moto S3, 3 replicas with one killed by kill -9 mid-job, and the
`cytosynth generate --workers 2` command (its own local Ray) killed with SIGKILL, then
interrupted with SIGINT, then terminated with SIGTERM, then re-run to the end. A local run under
another thread count writes the same bytes too. A job stops with one line (exit 75, resumable)
when its own Ray dies or when no replica can be placed within --replica-timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from cytosynth import storage  # noqa: E402
from cytosynth.cluster.distributed import pool_changes, run_distributed  # noqa: E402
from cytosynth.generation.runner import Runtime, run_local  # noqa: E402
from cytosynth.generation.generate_config import GenerateConfig  # noqa: E402
from cytosynth.synth.settings import SynthesisSettings  # noqa: E402
from cytosynth.jobs.cli import EXIT_STOPPED, EXIT_TERMINATED, main  # noqa: E402
from conftest import FAKE_CREDENTIALS  # noqa: E402
from ray_processes import actor_processes  # noqa: E402

NUM_TILES = 8
# The signal test's job: three interruptions, each after one more shard, must leave work to do
# however fast the 2 replicas (up to 4 shards in flight) run.
LONG_NUM_TILES = 24
RUNTIME = Runtime(device="cpu", batch_size=2, progress=False)


def config(out: str, num_tiles: int = NUM_TILES) -> GenerateConfig:
    return GenerateConfig(
        out=out, num_tiles=num_tiles, tiles_per_shard=1, normal_source="phantom", seed=7,
        synthesis=SynthesisSettings(steps=2, tile_size=256),
    )


# The same job as `config` on the command line (--num-tiles apart).
JOB_ARGS = ("--tiles-per-shard", "1", "--normal-source", "phantom", "--steps", "2",
            "--tile-size", "256", "--seed", "7", "--device", "cpu", "--batch-size", "2", "--quiet")


@pytest.fixture(scope="module")
def ray_session():
    # Two fake GPUs: replicas can reserve GPU resources while computing on CPU. Credentials never
    # travel in runtime_env: replicas inherit them from the environment this Ray starts with.
    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_CREDENTIALS.items():
            env.setenv(name, value)
        _init_ray()
    yield
    ray.shutdown()


def _init_ray() -> None:
    ray.init(
        address="local", num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False,
        logging_level="ERROR", object_store_memory=150 * 1024**2,
    )


@pytest.fixture(scope="module")  # minutes on a loaded 2-core machine: the tests using it are marked slow
def reference(ray_session, tmp_path_factory) -> dict[str, bytes]:
    """The dataset made by one replica: shard name -> tar bytes."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    summary = run_distributed(config(out), RUNTIME, workers=1)
    assert summary["tiles"] == NUM_TILES
    return shard_bytes(out)


def shard_bytes(out: str) -> dict[str, bytes]:
    return {url.rsplit("/", 1)[-1]: storage.get_bytes(url) for url in storage.shard_urls(out)}


def check_exactly_once(out: str, num_tiles: int = NUM_TILES) -> None:
    keys = [s["tile_index"] for s in storage.read_samples(out)]
    assert sorted(keys) == list(range(num_tiles))
    manifest = storage.read_manifest(out).to_pylist()
    assert sorted(int(row["key"]) for row in manifest) == list(range(num_tiles))
    assert storage.is_complete(out)


@pytest.mark.slow
def test_pool_of_fake_gpu_replicas_computing_on_cpu_writes_the_reference_dataset_to_s3(reference, s3_bucket):
    out = s3_bucket + "/job"
    summary = run_distributed(config(out), RUNTIME, workers=(1, 3), gpus_per_replica=0.5)
    assert summary["tiles"] == NUM_TILES and summary["shards"] == NUM_TILES
    check_exactly_once(out)
    stats = list(storage.iter_shard_stats(out))
    # Each replica reserved half of one of the session's 2 (fake) GPUs but computed on the CPU.
    assert all(s["gpus"] and s["device"] == "cpu" for s in stats)
    workers = {s["replica"] for s in stats}
    assert 1 <= len(workers) <= 3 and all(len(w) > 8 and w != "local" for w in workers)  # Ray actor ids
    assert all(s["node"] == ray.get_runtime_context().get_node_id() and s["attempt"] == 1 for s in stats)
    assert set(stats[0]["stage_seconds"]) == {"stage1", "detection", "stage2", "paste_back", "encode"}
    assert summary["this_run"]["shards"] == NUM_TILES and summary["this_run"]["stage_seconds"]["upload"] > 0
    # Invariant 1: replica count (and backend) does not change the data; on CPU not one byte.
    assert shard_bytes(out) == reference


class WatchedWorker:
    """A real ShardMaker that logs, per replica process, each model load and how many shards it
    is running at once (the replica's threads call `run` concurrently)."""

    def __init__(self, worker, log: str) -> None:
        self.worker, self.log = worker, log
        self.fingerprints, self.identity = worker.fingerprints, worker.identity
        self.running, self.lock = 0, threading.Lock()
        self._write("load")

    def _write(self, event: str) -> None:
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {event}\n")

    def run(self, shard, layout, attempt):
        with self.lock:
            self.running += 1
            self._write(f"running {self.running}")
        try:
            return self.worker.run(shard, layout, attempt)
        finally:
            with self.lock:
                self.running -= 1


def watched_worker(config: GenerateConfig, log: str, **kwargs) -> WatchedWorker:
    from cytosynth.generation.synthesis import load_shard_maker

    return WatchedWorker(load_shard_maker(config, batch_size=RUNTIME.batch_size, **kwargs), log)


@pytest.mark.slow
def test_a_replica_loads_its_models_once_and_runs_at_most_two_shards_at_a_time(reference, tmp_path):
    import functools

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the watched worker travels by value
    out, log = str(tmp_path / "out"), str(tmp_path / "replica.log")
    job = config(out)
    run_distributed(job, RUNTIME, workers=1, make_shard_maker=functools.partial(watched_worker, job, log))
    events = [line.split(" ", 1) for line in Path(log).read_text().splitlines()]
    assert [event for _, event in events].count("load") == 1 and len({pid for pid, _ in events}) == 1
    running = [int(event.split()[1]) for _, event in events if event.startswith("running")]
    assert len(running) == NUM_TILES  # one run per shard
    assert max(running) == 2  # the next shard synthesizes while the last one encodes and uploads
    assert shard_bytes(out) == reference


@pytest.mark.slow
def test_a_local_run_under_another_thread_count_writes_the_bytes_of_the_ray_replicas(reference, tmp_path):
    # Replicas compute with Ray's one CPU each; this process has its own count of torch threads.
    out = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run_local(config(out), RUNTIME)
    finally:
        torch.set_num_threads(threads)
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


HELD_SHARD = 3


def held_worker_factory(job: GenerateConfig, gate: Path):
    """The job's own ShardMaker, except that the first attempt at HELD_SHARD writes its pid to
    `gate` and waits there: the test then knows a replica is busy with a shard, on a slow machine
    or a fast one, and kills it. The retry (attempt 2, on a fresh replica) runs as normal."""

    def make(**kwargs):
        from cytosynth.cluster.distributed import load_shard_maker_in_replica

        worker = load_shard_maker_in_replica(job, batch_size=RUNTIME.batch_size, precision=RUNTIME.precision, **kwargs)
        run = worker.run

        def run_or_hold(shard, layout, attempt):
            if shard == HELD_SHARD and attempt == 1:
                gate.write_text(str(os.getpid()))
                time.sleep(300)  # killed long before; the job fails if not
                raise RuntimeError("the held replica was never killed")
            return run(shard, layout, attempt)

        worker.run = run_or_hold
        return worker

    return make


@pytest.mark.slow
def test_a_replica_killed_with_kill_9_while_busy_costs_only_its_shards(reference, tmp_path):
    out, gate = str(tmp_path / "out"), tmp_path / "held-replica.pid"
    killed: list[int] = []

    def kill_the_held_replica() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not gate.exists():
            time.sleep(0.05)
        time.sleep(0.2)  # the pid is written whole
        if gate.exists():
            killed.append(int(gate.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_held_replica, daemon=True)
    killer.start()
    summary = run_distributed(config(out), RUNTIME, workers=3, make_shard_maker=held_worker_factory(config(out), gate))
    killer.join(timeout=5)
    assert killed, "no replica took the held shard"
    assert summary["tiles"] == NUM_TILES
    check_exactly_once(out)
    assert shard_bytes(out) == reference
    assert {s["attempt"] for s in storage.iter_shard_stats(out) if s["shard"] == HELD_SHARD} == {2}


def test_unreachable_ray_address(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--out", str(out), "--num-tiles", "2", "--normal-source", "phantom",
                 "--steps", "2", "--tile-size", "256", "--ray-address", "127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and "127.0.0.1:1" in err[0]
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_replica_timeout_that_is_not_a_positive_number_of_seconds_is_one_line_with_nothing_written(value, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--out", str(out), "--num-tiles", str(NUM_TILES), *JOB_ARGS, "--workers", "2",
                 "--replica-timeout", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --replica-timeout must be a positive")
    assert not out.exists()


def test_replicas_that_cannot_be_placed_stop_the_job_after_the_replica_timeout_resumably(ray_session, tmp_path, capsys):
    # The session has 2 GPUs; a replica asking for 3 is never placed (on a cluster: no node big
    # enough and no autoscaler to add one). This process's Ray is the job's "cluster".
    out = tmp_path / "out"
    code = main(["generate", "--out", str(out), "--num-tiles", str(NUM_TILES), *JOB_ARGS, "--workers", "2",
                 "--gpus-per-replica", "3", "--replica-timeout", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_STOPPED, err
    assert len(err) == 1 and err[0].startswith("error: no replica was up for 0.5 s (--replica-timeout)"), err
    assert "1 CPU and 3 GPUs each" in err[0] and "re-run the same command to resume" in err[0]
    assert not storage.committed_shards(str(out))
    storage.check_not_foreign(str(out))  # the re-run may use this --out


def real_tile_output(out: str, tiles: int) -> str:
    """A cytosynth output of `tiles` noise tiles of 256 px, one shard each: a --real-tiles set."""
    for i in range(tiles):
        writer = storage.ShardWriter(out, i)
        image = np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        writer.add(i, image, {"tile_index": i, "width": 256, "height": 256, "boxes": [], "labels": [], "normal_boxes": []})
        writer.commit()
    return out


@pytest.mark.slow
def test_real_tiles_on_two_ray_replicas_write_the_tars_of_an_in_process_run(ray_session, tmp_path):
    real = real_tile_output(str(tmp_path / "real"), 4)
    job = ("--normal-source", "real", "--real-tiles", real, "--num-tiles", "4", "--tiles-per-shard", "1",
           "--steps", "1", "--tile-size", "256", "--cells", "1-1", "--seed", "7", "--device", "cpu", "--quiet")
    on_ray, in_process = str(tmp_path / "ray"), str(tmp_path / "local")
    assert main(["generate", "--out", on_ray, *job, "--workers", "2"]) == 0
    assert main(["generate", "--out", in_process, *job]) == 0
    stats = list(storage.iter_shard_stats(on_ray))
    assert all(s["replica"] != "local" for s in stats)  # Ray replicas made them
    assert [row["source"] for row in storage.manifest_rows(on_ray)] == ["real-to-synthetic"] * 4
    assert sum(sum(s["cells"].values()) for s in stats) == 4  # one edited cell per tile: stage 2 ran on the replicas
    # The replicas read tile i through the job's index, as this process did; on CPU not one byte differs.
    assert shard_bytes(on_ray) == shard_bytes(in_process)


# ------------------------------------------------------------------ the driver killed and resumed


_CLI_WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from cytosynth.jobs.cli import main; sys.exit(main(sys.argv[1:]))"
)


def start_generate(out: Path, log: Path, num_tiles: int = NUM_TILES) -> subprocess.Popen:
    """`cytosynth generate --workers 2` in a new process (and process group), as a user runs it
    from a terminal: Ctrl-C raises KeyboardInterrupt even where this test's own process ignores
    SIGINT (a background job of a non-interactive shell does, and its children inherit that)."""
    args = ["generate", "--out", str(out), "--workers", "2", "--num-tiles", str(num_tiles), *JOB_ARGS]
    argv = [sys.executable, "-c", _CLI_WITH_CTRL_C, *args]
    with open(log, "w") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_for_new_commit(out: Path, proc: subprocess.Popen, known: set[int], timeout: float = 300) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if storage.committed_shards(str(out)) - known:
            return storage.committed_shards(str(out))
        time.sleep(0.05)
    pytest.fail(f"no new shard committed (exit code {proc.poll()})")


def committed_files(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every committed shard's tar and stats JSON."""
    files = {}
    for shard in storage.committed_shards(str(out)):
        for path in (out / "shards" / f"{shard:06d}.tar", Path(storage.stats_url(str(out), shard))):
            files[path.name] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return files


def is_ray_agent(proc: psutil.Process) -> bool:
    try:
        return proc.cmdline()[0].startswith("ray::") and proc.cmdline()[0].rstrip().endswith("Agent")
    except (psutil.Error, IndexError):
        return False


def kill(procs: list[psutil.Process]) -> list[str]:
    """Kill the ones still running; their names."""
    killed = []
    for proc in procs:
        try:
            name = f"{proc.pid} {proc.name()}"
            proc.kill()
        except psutil.Error:  # already gone
            continue
        killed.append(name)
    return killed


def assert_gone(procs: list[psutil.Process], what: str, timeout: float = 30) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    leaked = kill(alive)
    assert not leaked, f"{what} outlived the driver: {leaked}"


@pytest.mark.slow
def test_driver_killed_interrupted_and_terminated_resumes_to_the_reference_dataset(tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"

    # 1. kill -9 the driver once a shard is committed: its local Ray dies with it.
    proc = start_generate(out, log, LONG_NUM_TILES)
    wait_for_new_commit(out, proc, set())
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # GCS, raylet and the replicas go at once. Ray's two per-node agents wait about a minute for
    # the dead GCS before they exit on their own; they hold nothing of the job, so they are let go.
    assert_gone([p for p in ray_processes if not is_ray_agent(p)], "the killed driver's Ray")
    kill([p for p in ray_processes if is_ray_agent(p)])
    after_kill = committed_files(out)
    assert 0 < len(after_kill) < 2 * LONG_NUM_TILES and not storage.is_complete(str(out))
    # What a kill during a tar's write leaves (the kill above may or may not land in one).
    (out / "shards" / ".tmp-000005.tar.0123456789abcdef").write_bytes(b"half a tar")

    # 2. Re-run; interrupt it (SIGINT, like Ctrl-C) after one more shard: it stops cleanly.
    proc = start_generate(out, log, LONG_NUM_TILES)
    wait_for_new_commit(out, proc, {int(name[:6]) for name in after_kill})
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert "interrupted" in log.read_text().splitlines()[-1]
    assert_gone(ray_processes, "the interrupted driver's Ray")
    after_interrupt = committed_files(out)
    assert {k: after_interrupt[k] for k in after_kill} == after_kill  # committed shards untouched

    # 3. Re-run; SIGTERM it (Kubernetes, a scheduler) after one more shard: as Ctrl-C, exit 143.
    proc = start_generate(out, log, LONG_NUM_TILES)
    wait_for_new_commit(out, proc, {int(name[:6]) for name in after_interrupt})
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_TERMINATED, log.read_text()
    assert log.read_text().splitlines()[-1].startswith("error: terminated (SIGTERM); finished work is kept")
    assert_gone(ray_processes, "the terminated driver's Ray")
    after_terminate = committed_files(out)
    assert {k: after_terminate[k] for k in after_interrupt} == after_interrupt

    # 4. Re-run to the end: only the missing shards are made; the dataset is the reference.
    proc = start_generate(out, log, LONG_NUM_TILES)
    assert proc.wait(timeout=300) == 0, log.read_text()
    final = committed_files(out)
    assert {k: final[k] for k in after_terminate} == after_terminate
    assert len(final) == 2 * LONG_NUM_TILES
    assert [p.name for p in out.rglob(".*")] == []  # no half-written file is left
    check_exactly_once(str(out), LONG_NUM_TILES)
    reference = tmp_path / "reference"  # the same job uninterrupted, in this process
    run_local(config(str(reference), LONG_NUM_TILES), RUNTIME)
    assert shard_bytes(str(out)) == shard_bytes(str(reference))


def wait_for_replicas(proc: subprocess.Popen, timeout: float = 300) -> list[psutil.Process]:
    """Once the driver's own Ray runs a ShardReplica actor: the driver's Ray processes."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        replicas = {pid for pid, _ in actor_processes("ShardReplica")}
        if replicas & {child.pid for child in children}:
            return children
        time.sleep(0.05)
    pytest.fail(f"no replica started (exit code {proc.poll()})")


@pytest.mark.slow
@pytest.mark.timeout(300)  # the bound: such a job used to wait for ever ("0 up, 2 starting")
@pytest.mark.parametrize("process", ["raylet", "gcs_server"])
def test_a_job_whose_own_ray_dies_stops_with_one_line_and_exit_75(process, tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = start_generate(out, log)
    ray_processes: list[psutil.Process] = []
    try:
        ray_processes = wait_for_replicas(proc)  # the replicas are loading the models
        [victim] = [p for p in ray_processes if p.name() == process]
        victim.kill()  # the OOM killer, a crash
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        kill(ray_processes)  # what the driver's ray.shutdown left (agents waiting for the dead GCS)
    lines = log.read_text().splitlines()
    assert code == EXIT_STOPPED, lines
    assert [line for line in lines if "error" in line.lower() or "Traceback" in line] == lines[-1:], lines
    assert lines[-1].startswith("error: this job's own Ray died (") and process in lines[-1]
    assert lines[-1].endswith("finished shards are kept, re-run the same command to resume")
    assert not storage.is_complete(str(out))
