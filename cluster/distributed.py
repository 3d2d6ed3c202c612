"""Distributed job runner: the same job as `run_local`, its shards streamed through a pool of
`ShardReplica` Ray actors that grows and shrinks with the work.

Pool of (MIN, MAX) replicas. MIN are requested up front (at least one: job.json records the
models' fingerprints, which a replica reports once it has loaded them). While shards wait for a
free slot the pool requests more, up to MAX; as soon as no shard is left for a replica it is
released. Requesting never blocks the driver: an actor Ray cannot place yet stays pending, which
is exactly the demand the Ray autoscaler answers by adding a node, and a replica takes shards
only once its models are loaded. Released replicas free their GPUs, so idle nodes go away.

Backpressure: at most IN_FLIGHT_PER_REPLICA shards per replica (one synthesizing, one encoding
and uploading or queued); shards are drawn lazily from the to-do list and results carry no
per-tile data, so the driver's memory does not grow with the job.

Faults: a replica that dies (kill -9, lost node) costs only its in-flight shards, which go back
to the queue; the commit is atomic and a redone shard has the same bytes. A shard that loses
MAX_SHARD_ATTEMPTS replicas, or raises, fails the job with its shard, replica, node and cause.
A job stops, resumable, when its own local Ray dies (nothing else would tell the driver) or when
no replica is up for --replica-timeout (nothing can be placed: no such node, no autoscaler).

Plain actors and object refs rather than a Ray Data actor pool: the shard is the unit of work, of
commit and of retry, and the driver must know which shards each replica holds to redo exactly
those; one object ref per shard and `ray.wait` give that with nothing in between.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm.auto import tqdm

from cytosynth.synth import InvalidInputError

from cytosynth.generation.generate_config import GenerateConfig, JobLayout, PendingShards
from cytosynth.generation.runner import Runtime, run_job
from cytosynth.synth.edit_plan import Plan

from .failures import REPLICA_TIMEOUT, USER_ERRORS, JobStoppedError, first_line, raised_error
from .ray_session import check_local_gpus, check_own_ray, connect, forwarded_env, kill_actor, probe
from .replica import ShardReplica, ShardMakerFactory

IN_FLIGHT_PER_REPLICA = 2
MAX_SHARD_ATTEMPTS = 3  # a shard whose replica dies this many times fails the job
QUIET_SECONDS = 120  # log a line when nothing finishes for this long
POLL_SECONDS = 5.0  # while nothing finishes, how often the driver checks its own Ray and the replica deadline


class DistributedJobError(RuntimeError):
    """The job cannot finish: a shard raised, or replicas keep dying."""


@dataclass
class _Replica:
    handle: Any
    ready: bool = False  # models loaded; takes shards
    in_flight: int = 0
    identity: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        actor = self.identity.get("replica") or self.handle._actor_id.hex()
        node = self.identity.get("node")
        return f"replica {actor[:12]}" + (f" on node {node[:12]}" if node else "")


class ShardScheduler:
    """Streams shards through an elastic pool of replicas; see the module docstring."""

    def __init__(
        self,
        start_replica: Callable[[], Any],
        size: tuple[int, int],
        layout: JobLayout,
        replica_timeout: float = REPLICA_TIMEOUT,
        check_ray: Callable[[], None] = lambda: None,
        demand: str = "",
    ) -> None:
        """`check_ray` raises JobStoppedError when the Ray the replicas need is gone; `demand`
        says what one replica asks Ray for (in the replica-timeout message)."""
        self.start_replica = start_replica
        self.min_size, self.max_size = size
        self.layout = layout
        self.replica_timeout, self.check_ray, self.demand = replica_timeout, check_ray, demand
        self.replicas: dict[int, _Replica] = {}
        self.pending: dict[Any, tuple[int, int | None, int]] = {}  # ref -> (replica, shard or None: load, attempt)
        self.retry: deque[tuple[int, int]] = deque()  # (shard, attempt) whose replica died
        self.shards: Iterator[int] = iter(())
        self.unassigned: int | None = None  # shards not handed out yet; None until the to-do list is known
        self.fingerprints: dict[str, str] | None = None
        self.bar: Any = None
        self.on_shard: Callable[[dict[str, Any]], None] = lambda stats: None
        self._next_key = 0
        self._lost_loading = 0
        self._replica_up_at = self._quiet_since = time.monotonic()  # last seen: a ready replica; any event

    def start(self) -> dict[str, str]:
        """Request the first replicas; wait until one has loaded the models; its fingerprints."""
        self._request(max(self.min_size, 1))
        while self.fingerprints is None:
            self._step()
        return self.fingerprints

    def run(self, shards: Iterable[int], count: int, bar: Any, on_shard: Callable[[dict[str, Any]], None]) -> None:
        """Make the `count` shards of `shards`: returns once every one is committed."""
        self.shards, self.unassigned, self.bar, self.on_shard = iter(shards), count, bar, on_shard
        self._balance()
        while self.unassigned or self.retry or any(r.in_flight for r in self.replicas.values()):
            self._step()
            self._balance()

    def close(self) -> None:
        for key in list(self.replicas):
            self._release(key)

    # -- events

    def _step(self) -> None:
        """Wait for one load or shard to finish and act on it."""
        self.check_ray()  # replicas may keep working a while without it; the job stops at once
        if any(r.ready for r in self.replicas.values()):
            self._replica_up_at = time.monotonic()
        done, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(POLL_SECONDS, self.replica_timeout))
        if not done:
            self._waiting()
            return
        self._quiet_since = time.monotonic()
        key, shard, attempt = self.pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayActorError as err:
            self._lost(key, [(shard, attempt)] if shard is not None else [], err)
        except ray.exceptions.RayTaskError as err:
            raise self._failure(key, shard, attempt, err) from None
        else:
            if shard is None:
                self._loaded(key, result)
            else:
                self._committed(key, result)

    def _waiting(self) -> None:
        """Nothing finished for POLL_SECONDS (the next step checks the job's own Ray): stop once no
        replica was up for `replica_timeout` (none could be placed or load), and say every
        QUIET_SECONDS that the job waits rather than look hung."""
        now = time.monotonic()
        starting = sum(not r.ready for r in self.replicas.values())
        if starting == len(self.replicas) and now - self._replica_up_at >= self.replica_timeout:
            raise JobStoppedError(
                f"no replica was up for {self.replica_timeout:g} s (--replica-timeout): {starting} requested "
                f"({self.demand or 'resources'} each) but none placed and loaded; finished shards are kept, "
                "re-run the same command to resume"
            )
        if now - self._quiet_since >= QUIET_SECONDS:  # e.g. replicas waiting for the autoscaler
            _log(f"no shard finished for {QUIET_SECONDS} s; {starting} replicas still waiting for resources or loading")
            self._quiet_since = now

    def _loaded(self, key: int, info: dict[str, Any]) -> None:
        replica = self.replicas[key]
        replica.ready, replica.identity = True, info
        if self.fingerprints is None:
            self.fingerprints = info["fingerprints"]
        elif info["fingerprints"] != self.fingerprints:  # e.g. a node with other weights under the same path
            raise DistributedJobError(f"{replica.describe()} loaded different models: {info['fingerprints']}")
        self._show()

    def _committed(self, key: int, stats: dict[str, Any]) -> None:
        self.replicas[key].in_flight -= 1
        if self.bar is not None:
            self.bar.update(stats["tiles"])
        self.on_shard(stats)

    def _lost(self, key: int, shards: list[tuple[int, int]], err: Exception) -> None:
        """A replica died: `shards` (the one that told) and its other in-flight shards go back
        to the queue; the pool replaces it if shards wait. When the job's own Ray died with it,
        that is the one thing to say."""
        self.check_ray()
        replica = self.replicas.pop(key)
        for ref in [ref for ref, (k, _, _) in self.pending.items() if k == key]:
            _, shard, attempt = self.pending.pop(ref)
            if shard is not None:
                shards.append((shard, attempt))
        kill_actor(replica.handle)
        cause = first_line(err)
        if not replica.ready:
            self._lost_loading += 1
            if self._lost_loading > self.max_size + MAX_SHARD_ATTEMPTS:
                raise DistributedJobError(f"replicas keep dying while loading models ({self._lost_loading} lost); last: {cause}")
        for shard, attempt in shards:
            if attempt >= MAX_SHARD_ATTEMPTS:
                raise DistributedJobError(f"shard {shard} failed: its replica died {attempt} times; last: {cause}")
            self.retry.append((shard, attempt + 1))
        lost = ", ".join(str(s) for s, _ in shards) or "none"
        _log(f"{replica.describe()} died ({cause}); shards back in the queue: {lost}")
        if self.unassigned is None and not self.replicas:  # still starting: keep one coming
            self._request(1)
        self._show()

    def _failure(self, key: int, shard: int | None, attempt: int, err: Exception) -> Exception:
        cause = raised_error(err)
        if isinstance(cause, USER_ERRORS):
            return cause  # the user's input: one clear line, as in a local run
        where = self.replicas[key].describe()
        what = f"{where} failed to load the models" if shard is None else f"shard {shard} failed on {where} (attempt {attempt})"
        message = f"{what}: {type(cause).__name__}: {first_line(cause)}"
        _log(message)
        return DistributedJobError(message)

    # -- the pool

    def _balance(self) -> None:
        """Hand out shards, then grow the pool for shards still waiting or shrink it."""
        self._assign()
        starting = [k for k, r in self.replicas.items() if not r.ready]
        idle = [k for k, r in self.replicas.items() if r.ready and not r.in_flight]
        request, release_starting, release_idle = pool_changes(
            self.unassigned + len(self.retry), len(self.replicas), len(starting), len(idle), self.max_size
        )
        self._request(request)
        for key in starting[len(starting) - release_starting :] + idle[:release_idle]:  # newest starting first
            self._release(key)
        self._show()

    def _assign(self) -> None:
        """Give ready replicas shards up to IN_FLIGHT_PER_REPLICA, the least busy first."""
        for level in range(1, IN_FLIGHT_PER_REPLICA + 1):
            for key, replica in self.replicas.items():
                if replica.ready and replica.in_flight < level:
                    job = self._take()
                    if job is None:
                        return
                    shard, attempt = job
                    self.pending[replica.handle.run.remote(shard, self.layout, attempt)] = (key, shard, attempt)
                    replica.in_flight += 1

    def _take(self) -> tuple[int, int] | None:
        if self.retry:
            return self.retry.popleft()
        if self.unassigned:
            self.unassigned -= 1
            return next(self.shards), 1
        return None

    def _request(self, count: int) -> None:
        for _ in range(count):
            key, self._next_key = self._next_key, self._next_key + 1
            self.replicas[key] = _Replica(self.start_replica())
            self.pending[self.replicas[key].handle.load.remote()] = (key, None, 0)

    def _release(self, key: int) -> None:
        replica = self.replicas.pop(key)
        for ref in [ref for ref, (k, _, _) in self.pending.items() if k == key]:
            del self.pending[ref]
        kill_actor(replica.handle)

    def _show(self) -> None:
        if self.bar is not None:
            ready = sum(r.ready for r in self.replicas.values())
            self.bar.set_postfix_str(f"replicas {ready} up, {len(self.replicas) - ready} starting", refresh=False)


def pool_changes(waiting: int, replicas: int, starting: int, idle: int, max_size: int) -> tuple[int, int, int]:
    """(replicas to request, starting replicas to release, idle replicas to release).

    Asked after every ready replica with a free slot got a shard, so `waiting` shards found no
    slot. Each replica still starting will take one of them; for the rest, more replicas are
    requested up to `max_size`. With fewer waiting shards than starting replicas, the surplus
    starting ones and every idle replica are released: no shard is left for them.
    """
    if waiting > starting:
        return max(0, min(waiting - starting, max_size - replicas)), 0, 0
    return 0, starting - waiting, idle


def run_distributed(
    config: GenerateConfig,
    runtime: Runtime = Runtime(),
    workers: int | tuple[int, int] = 1,
    ray_address: str | None = None,
    gpus_per_replica: float = 0.0,
    replica_timeout: float = REPLICA_TIMEOUT,
    *,
    make_shard_maker: ShardMakerFactory | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a whole job on a pool of Ray replicas (local Ray, or the cluster at `ray_address`).

    `workers` is W or (MIN, MAX). Each replica reserves `gpus_per_replica` GPUs (or one CPU when
    0) and computes on `runtime.device` (None: the reserved GPU, else CPU). Resumes like
    `run_local`: job.json must match, committed shards are skipped. An already-connected Ray
    session (ray.init done by the caller) is used as is. `make_shard_maker` replaces the model-loading
    ShardMaker (benchmarks); `on_shard` sees each shard's stats as it commits.

    Stops (JobStoppedError; a re-run resumes): at once when a local Ray this call started loses
    its GCS or raylet, and anywhere when the pool has had no replica up (none placed, or none
    loaded) for `replica_timeout` seconds.
    """
    executor = RayExecutor(runtime, workers, ray_address, gpus_per_replica, replica_timeout, make_shard_maker, on_shard)
    return run_job(config, runtime, executor)


@dataclass
class RayExecutor:
    """The shards of a job on a pool of Ray replicas (`run_distributed` says what each field does)."""

    runtime: Runtime
    workers: int | tuple[int, int] = 1
    ray_address: str | None = None
    gpus_per_replica: float = 0.0
    replica_timeout: float = REPLICA_TIMEOUT
    make_shard_maker: ShardMakerFactory | None = None
    on_shard: Callable[[dict[str, Any]], None] | None = None
    scheduler: ShardScheduler | None = None  # once started

    @property
    def size(self) -> tuple[int, int]:
        """The pool's (MIN, MAX) replicas."""
        low, high = (self.workers, self.workers) if isinstance(self.workers, int) else self.workers
        if high < 1 or low < 0 or low > high:
            raise InvalidInputError(f"--workers must be W >= 1 or MIN-MAX with 0 <= MIN <= MAX, MAX >= 1; got {low}-{high}")
        return low, high

    def check(self) -> None:
        self.size  # noqa: B018 (raises on a bad --workers)
        if self.gpus_per_replica < 0:
            raise InvalidInputError("--gpus-per-replica must be >= 0")
        if not self.replica_timeout > 0:  # NaN too; inf waits for ever (an autoscaler that will come)
            raise InvalidInputError(f"--replica-timeout must be a positive number of seconds, got {self.replica_timeout}")
        if (self.runtime.device or "").startswith("cuda") and self.gpus_per_replica == 0:
            raise InvalidInputError("--device cuda under Ray needs --gpus-per-replica > 0 (Ray hides GPUs it did not reserve)")
        if self.ray_address:
            probe(self.ray_address)  # before anything is written

    @contextmanager
    def started(self, config: GenerateConfig, layout: JobLayout, plan: Plan | None) -> Iterator[dict[str, str]]:
        """Ray connected and the pool started; yields the first replica's model fingerprints.
        The replicas get the driver's parsed `plan` (pickled with their factory)."""
        r, gpus, local = self.runtime, self.gpus_per_replica, self.ray_address is None
        make_shard_maker = self.make_shard_maker or functools.partial(
            load_shard_maker_in_replica, config, batch_size=r.batch_size, precision=r.precision, plan=plan
        )
        started_ray = connect(self.ray_address, self.size[1], gpus)
        try:
            if started_ray and local:
                check_local_gpus(gpus)
            options: dict[str, Any] = {
                "num_cpus": 1,
                "num_gpus": gpus,
                "max_restarts": 0,
                "max_concurrency": IN_FLIGHT_PER_REPLICA,  # a shard uploads while the next one synthesizes
            }
            env = forwarded_env() if local else {}
            if env:
                options["runtime_env"] = {"env_vars": env}
            replica_class = ray.remote(**options)(ShardReplica)
            self.scheduler = ShardScheduler(
                lambda: replica_class.remote(make_shard_maker, r.device), self.size, layout, self.replica_timeout,
                check_ray=check_own_ray if started_ray and local else lambda: None,
                demand=f"1 CPU and {gpus:g} GPUs" if gpus else "1 CPU",
            )
            if r.progress:
                _log(f"starting {max(self.size[0], 1)} of up to {self.size[1]} replicas; waiting for the first to load the models")
            yield self.scheduler.start()
        finally:
            if self.scheduler is not None:
                self.scheduler.close()
            if started_ray:
                ray.shutdown()

    def run(self, pending: PendingShards, layout: JobLayout, bar: Any, tally: Callable[[dict[str, Any]], None]) -> None:
        def tally_and_tell(stats: dict[str, Any]) -> None:
            tally(stats)
            if self.on_shard:
                self.on_shard(stats)

        self.scheduler.run(pending, len(pending), bar, tally_and_tell)


def load_shard_maker_in_replica(config: GenerateConfig, **kwargs: Any) -> Any:
    """`synthesis.load_shard_maker`, imported where it runs: the driver pickles only this
    reference, so it never imports torch or diffusers; a bad bundle, detector or preset fails in
    the replica's `load` and comes back as the same one-line error (`ShardScheduler._failure`)."""
    from cytosynth.generation.synthesis import load_shard_maker

    return load_shard_maker(config, **kwargs)


def _log(message: str) -> None:
    tqdm.write(f"cytosynth: {message}", file=sys.stderr)
