"""Distributed job runner: the same job as `run_local`, its shards spread over Ray actors.

Each `ShardReplica` actor wraps one `ShardWorker` (models loaded once per actor, pinned to
`gpus_per_replica` GPUs, or one CPU). The driver keeps at most `IN_FLIGHT_PER_REPLICA` shards
queued on each replica (backpressure: shards are drawn lazily from the to-do list, so the driver
holds no per-tile state), collects results with `ray.wait`, and when a replica dies (kill -9, lost
node) hands its in-flight shards to a fresh replica. The shard is the unit of retry: ShardWriter's
commit is atomic, so a half-done shard is never visible, and a redone shard has the same bytes.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.synth import InvalidInputError

from .runner import Runtime, finalize_job, prepare_job, validate_config
from .worker import GenerateConfig, JobLayout, ShardWorker

IN_FLIGHT_PER_REPLICA = 2
MAX_SHARD_ATTEMPTS = 3  # a shard whose replica dies this many times fails the job
USER_ERRORS = (InvalidInputError, storage.StorageError)
# Passed to local replicas so they reach the same storage as the driver (endpoint, credentials).
# Never written to job.json or logs; on a remote cluster nodes use their own (instance profile).
_ENV_PREFIXES = ("AWS_", "FSSPEC_")
_ENV_NAMES = ("NO_PROXY", "no_proxy", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


class ShardReplica:
    """Body of the `ShardReplica` actor: a ShardWorker, its models loaded on first use."""

    def __init__(self, config: GenerateConfig, device: str, batch_size: int) -> None:
        import ray

        self.config, self.device, self.batch_size = config, device, batch_size
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self._worker: ShardWorker | None = None

    def _get(self) -> ShardWorker:
        if self._worker is None:
            self._worker = ShardWorker(self.config, self.device, self.batch_size, worker_id=self.actor_id)
        return self._worker

    def load(self) -> dict[str, Any]:
        """Load the models (once); returns their fingerprints and this process' id."""
        return {"fingerprints": self._get().bundle.fingerprints, "pid": os.getpid(), "actor_id": self.actor_id}

    def run(self, shard: int, layout: JobLayout) -> dict[str, Any]:
        return self._get().run(shard, layout)


def run_distributed(
    config: GenerateConfig,
    runtime: Runtime = Runtime(),
    workers: int = 1,
    ray_address: str | None = None,
    gpus_per_replica: float = 0.0,
) -> dict[str, Any]:
    """Run a whole job on `workers` Ray replicas (local Ray, or the cluster at `ray_address`).

    Resumes like `run_local`: job.json must match, committed shards are skipped.
    An already-connected Ray session (ray.init done by the caller) is used as is.
    """
    import ray

    if workers < 1:
        raise InvalidInputError("--workers must be at least 1")
    if gpus_per_replica < 0:
        raise InvalidInputError("--gpus-per-replica must be >= 0")
    if ray_address:
        _probe(ray_address)  # before anything is written
    start = time.perf_counter()
    storage.ensure_writable(config.out)
    layout = validate_config(config)
    started_ray = _connect(ray_address, workers, gpus_per_replica)
    try:
        device = "cuda" if gpus_per_replica > 0 else "cpu"
        options: dict[str, Any] = {"num_gpus": gpus_per_replica, "max_restarts": 0}
        if gpus_per_replica == 0:
            options["num_cpus"] = 1
        if ray_address is None:
            options["runtime_env"] = {"env_vars": _forwarded_env()}
        actor_class = ray.remote(**options)(ShardReplica)

        def spawn() -> Any:
            replica = actor_class.remote(config, device, runtime.batch_size)
            replica.load.remote()  # start loading models now, in parallel with the others
            return replica

        replicas = {i: spawn() for i in range(workers)}
        # Fingerprints come from a replica (the driver never loads models).
        fingerprints = _get_one(ray, replicas[0].load.remote())["fingerprints"]
        todo = prepare_job(config, layout, fingerprints)
        done_tiles = layout.num_tiles - sum(len(layout.tiles(s)) for s in todo)
        with tqdm(
            total=layout.num_tiles, initial=done_tiles, unit="tile", disable=not runtime.progress, desc="generate"
        ) as bar:
            _schedule(ray, iter(todo), layout, replicas, spawn, bar)
    finally:
        if started_ray:
            ray.shutdown()
    return finalize_job(config, layout, time.perf_counter() - start)


def _schedule(ray: Any, shards: Iterator[int], layout: JobLayout, replicas: dict[int, Any], spawn: Any, bar: Any) -> None:
    """Keep every replica busy with a bounded number of shards until all are committed."""
    retry: deque[int] = deque()
    attempts: dict[int, int] = {}  # only shards that lost a replica
    pending: dict[Any, tuple[int, int]] = {}  # object ref -> (shard, replica key)
    in_flight = {key: 0 for key in replicas}
    next_key = len(replicas)

    def take() -> int | None:
        return retry.popleft() if retry else next(shards, None)

    def fill() -> None:
        for key, replica in replicas.items():
            while in_flight[key] < IN_FLIGHT_PER_REPLICA:
                shard = take()
                if shard is None:
                    return
                pending[replica.run.remote(shard, layout)] = (shard, key)
                in_flight[key] += 1

    def show() -> None:
        bar.set_postfix(replicas_alive=len(replicas), refresh=False)

    show()
    fill()
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        shard, key = pending.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            attempts[shard] = attempts.get(shard, 0) + 1
            if attempts[shard] >= MAX_SHARD_ATTEMPTS:
                raise RuntimeError(f"shard {shard} failed: its replica died {attempts[shard]} times") from None
            retry.append(shard)
            if key in replicas:  # first news of this replica's death: replace it
                ray.kill(replicas.pop(key), no_restart=True)
                in_flight.pop(key)
                replicas[next_key], in_flight[next_key] = spawn(), 0
                next_key += 1
                show()
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            if isinstance(cause, USER_ERRORS):
                raise cause from None
            raise RuntimeError(f"shard {shard} failed: {type(cause).__name__}: {cause}") from None
        else:
            in_flight[key] -= 1
            bar.update(len(layout.tiles(shard)))
        fill()


def _get_one(ray: Any, ref: Any) -> Any:
    """ray.get, with a user error raised in the actor re-raised as itself (one-line message)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(getattr(err, "cause", None), USER_ERRORS):
            raise err.cause from None
        raise


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}


def _connect(ray_address: str | None, workers: int, gpus_per_replica: float) -> bool:
    """Connect to (or start) Ray; True when this call started the session it must shut down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if ray_address is None:
        kwargs.update(num_cpus=workers if gpus_per_replica == 0 else None, include_dashboard=False)
    try:
        ray.init(address=ray_address or None, **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"cannot connect to Ray at {ray_address or 'local'}: {first}") from None
    return True


def _probe(address: str, timeout: float = 5.0) -> None:
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
