"""Autoscaling (docs/design.md §2): a job whose replicas need GPUs, on a cluster whose head has
none, makes the Ray autoscaler launch GPU worker nodes; the job runs on them; idle nodes go away.

The cluster is Ray's fake multi-node provider on this machine, started the way
`ray.cluster_utils.AutoscalingCluster.start` does it (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`), with three differences: AutoscalingCluster cannot be used as is here
because its config template (fake_multi_node/example.yaml) is missing from this Ray wheel, so the
provider is loaded as an "external" one (which needs no template); its start/shutdown run
`ray stop --force`, which kills every Ray process on the machine (other people's too), so this
cluster gets a private port and temp dir and its teardown kills only its own processes (found by
their working directory, a private folder); token auth is off, as on a laptop.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")  # the fake cluster, the job and gpu_nodes run it in their own processes
psutil = pytest.importorskip("psutil")

from cytosynth import storage  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_TILES = 6
GPU_NODE = "fake-gpu-node"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# Empty lists the cluster-launcher schema expects; the fake provider runs no commands.
_NO_COMMANDS = {
    key: [] for key in (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
        "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
    )
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """A CPU-only head and a GPU worker type, min 0 / max 2, idle nodes removed after ~60 s."""
    return {
        "cluster_name": "cytosynth-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            GPU_NODE: {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1.0,  # a node counts as idle until its replica's worker starts, which
        # took over 15 s on a loaded 2-core machine: a shorter timeout removed nodes under starting
        # replicas (CI: "replicas keep dying while loading models (6 lost)")
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **_NO_COMMANDS,
    }


class FakeGpuCluster:
    """A Ray head (1 CPU, no GPU) with an autoscaler that launches fake GPU nodes on this machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder  # the working directory of every process of this cluster
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.folder / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(self.address)))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run(
            [
                "ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.folder / 'ray'}", f"--autoscaling-config={config}",
                "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={100 * 1024**2}",
                "--include-dashboard=false", "--disable-usage-stats",
                f"--ray-client-server-port={_free_port()}", "--dashboard-agent-listen-port=0",
            ],
            cwd=self.folder, env=env, check=True, capture_output=True, timeout=180,
        )

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: started in its folder, and their children."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if proc.cwd() == str(self.folder):
                    found[proc.pid] = proc
                    found.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def fake_gpu_cluster(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A short folder: Ray's unix sockets live under --temp-dir and their paths must stay under
    # 108 bytes, which pytest-xdist's per-worker temp folders (".../popen-gw1/...") overrun.
    cluster = FakeGpuCluster(Path(tempfile.mkdtemp(prefix="cyto-ray-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        alive = cluster.processes()
        shutil.rmtree(cluster.folder, ignore_errors=True)
        assert not alive, "processes of the test cluster outlived its teardown"


_GPU_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps({n["NodeID"]: n["Alive"] for n in ray.nodes() if n["Resources"].get("GPU") or not n["Alive"]}))
"""


def gpu_nodes(address: str) -> dict[str, bool]:
    """Node id -> alive, for every GPU node the cluster ever had.

    Asked from another interpreter: a driver of this cluster (token auth off) leaves its process's
    Ray config at "disabled", and the next local ray.init in that process (another test file under
    pytest-xdist) starts a token-auth GCS that it then cannot reach ("Failed to start GCS")."""
    asked = subprocess.run([sys.executable, "-c", _GPU_NODES, address], capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr[-2000:]
    return json.loads(asked.stdout.splitlines()[-1])


def test_gpu_replicas_make_the_autoscaler_launch_gpu_nodes_and_the_job_completes_on_them(fake_gpu_cluster, tmp_path):
    assert not gpu_nodes(fake_gpu_cluster.address)  # min 0: no GPU node before the job
    out = str(tmp_path / "out")
    # Replicas reserve a (fake) GPU each and compute on CPU; the head has none, so every replica
    # request waits until the autoscaler has launched a GPU node for it. The job is the CLI in its
    # own interpreter, as a user runs it: in a process where Ray Data had run before (another test
    # file under pytest-xdist), every replica this driver created was cancelled before it started.
    job = subprocess.run(
        [sys.executable, "-m", "cytosynth.jobs.cli", "generate", "--out", out, "--num-tiles", str(NUM_TILES),
         "--tiles-per-shard", "1", "--normal-source", "phantom", "--steps", "2", "--tile-size", "256", "--seed", "3",
         "--device", "cpu", "--batch-size", "1", "--workers", "0-2", "--ray-address", fake_gpu_cluster.address,
         "--gpus-per-replica", "1", "--quiet"],
        capture_output=True, text=True, timeout=480,
    )
    assert job.returncode == 0, job.stderr
    assert sorted(s["tile_index"] for s in storage.read_samples(out)) == list(range(NUM_TILES))  # exactly once
    launched = gpu_nodes(fake_gpu_cluster.address)
    job_nodes = {s["node"] for s in storage.iter_shard_stats(out)}
    assert launched and job_nodes <= set(launched), "shards ran outside the GPU nodes the autoscaler launched"
    assert all(s["gpus"] and s["device"] == "cpu" for s in storage.iter_shard_stats(out))

    # The job released its replicas, so the autoscaler removes the idle GPU nodes.
    deadline = time.time() + 180
    while any(gpu_nodes(fake_gpu_cluster.address).values()) and time.time() < deadline:
        time.sleep(2)
    assert not any(gpu_nodes(fake_gpu_cluster.address).values()), "idle GPU nodes were not removed"
