"""One Ray session per job, the same for generation, FID features and training: connect to a
cluster or start a private local Ray, fail fast on an unreachable address, keep the CLI's
SIGTERM handler, tell when a local Ray this job started has died, and forward the driver's
storage settings (never its secrets) to local replicas."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import ray

from cytosynth import storage
from cytosynth.synth import InvalidInputError

from .failures import JobStoppedError, first_line

# The processes of a Ray this job started without which no replica can run (a dead log monitor
# or agent does not stop the job).
_ESSENTIAL_RAY_PROCESSES = ("gcs_server", "raylet")
# Passed to local replicas through runtime_env so they reach the same storage as the driver
# (endpoint, region, proxy). Never a secret: Ray logs runtime_env in plain text
# (runtime_env_agent.log). Credentials reach replicas by inheritance (a local Ray this job starts
# inherits the driver's environment) or from the nodes' own chain on a cluster.
_ENV_PREFIXES = ("AWS_", "FSSPEC_")
_ENV_NAMES = ("NO_PROXY", "no_proxy", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


def kill_actor(handle: Any) -> None:
    """Stop an actor (a replica) for good. One whose creation Ray already cancelled (a node the autoscaler
    gave up on) cannot be killed and is gone anyway: Ray says so with a RaySystemError."""
    try:
        ray.kill(handle, no_restart=True)
    except ray.exceptions.RaySystemError:
        pass


def forwarded_env() -> dict[str, str]:
    """The driver's storage settings for local replicas, without any secret-looking variable."""
    return {
        k: v for k, v in os.environ.items()
        if (k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES) and not storage.is_secret_name(k)
    }


def connect(ray_address: str | None, max_replicas: int, gpus_per_replica: float) -> bool:
    """Connect to (or start) Ray; True when this call started the session it must shut down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if ray_address is None:
        # "local": a fresh Ray for this job, never a cluster someone else started on this machine.
        kwargs.update(num_cpus=max_replicas if gpus_per_replica == 0 else None, include_dashboard=False)
    with _keeping_sigterm_handler():
        try:
            ray.init(address=ray_address or "local", **kwargs)
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            raise InvalidInputError(f"cannot connect to Ray at {ray_address or 'local'}: {first_line(err)}") from None
    return True


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init installs a SIGTERM handler that calls sys.exit mid-job; the job's own (the CLI's:
    SIGTERM as Ctrl-C, replicas released, resumable) stays in place."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        yield
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_own_ray() -> None:
    """Raise JobStoppedError when the local Ray this job started lost its GCS or raylet (killed,
    OOM): no replica can run again, and nothing would tell the driver, which would wait for ever."""
    node = ray._private.worker._global_node  # the processes ray.init started (no public API)
    dead = sorted({kind for kind, _ in node.dead_processes() if kind in _ESSENTIAL_RAY_PROCESSES}) if node else []
    if dead:
        raise JobStoppedError(
            f"this job's own Ray died ({' and '.join(dead)} exited); finished shards are kept, "
            "re-run the same command to resume"
        )


def check_local_gpus(gpus_per_replica: float) -> None:
    """On a Ray this job started, a replica asking for more GPUs than exist would wait forever."""
    total = ray.cluster_resources().get("GPU", 0)
    if gpus_per_replica > total:
        raise InvalidInputError(
            f"--gpus-per-replica {gpus_per_replica:g} but this machine has {total:g} GPUs for Ray; "
            "use --ray-address for a cluster, or --gpus-per-replica 0 for CPU replicas"
        )


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when a Ray address cannot be reached (ray.init would retry for long)."""
    if address == "auto":
        return
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        host, port = host_port, "10001" if address.startswith("ray://") else "6379"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise InvalidInputError(f"cannot reach Ray at {address}: {err.strerror or err}") from None
