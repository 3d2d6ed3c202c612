"""Distributed featurisation for FID/KID/IS: image-set slices spread over Ray replicas.

Each replica (a Ray actor reserving ``gpus_per_replica`` GPUs and ``threads`` CPUs) loads the
feature extractor once, takes slices from the driver, at most ``SLICES_IN_FLIGHT`` queued at a
time, and folds them into its own statistics (`evaluation.features.SetFeaturizer`). Only those
statistics leave the replica, once, at the end; the driver merges them, so no process ever holds
a set's features.

A replica that dies takes the statistics of every slice it had; the driver re-queues those
slices on a fresh replica, so each image still counts exactly once.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from cytosynth.evaluation.features import (
    ExtractorFile,
    FeatureSettings,
    SetFeaturizer,
    SetOptions,
    Slice,
    featurize_here,
    merge_statistics,
)
from cytosynth.storage.imagesets import ImageUnit
from cytosynth.synth import InvalidInputError
from cytosynth.synth.metrics import SetStatistics

from .failures import USER_ERRORS, first_line, raised_error

SLICES_IN_FLIGHT = 2  # per replica: one featurising while the next one's bytes arrive
MAX_SLICE_ATTEMPTS = 3  # a slice whose replica dies this many times fails the job


class FeatureReplica:
    """Body of the ``FeatureReplica`` Ray actor: one SetFeaturizer, its extractor loaded once."""

    def __init__(self, extractor: ExtractorFile, options: Mapping[str, SetOptions], settings: FeatureSettings, device: str) -> None:
        self._featurizer = SetFeaturizer(extractor.load(device), options, settings)

    def add(self, work: Slice) -> int:
        return self._featurizer.add(work)

    def take_results(self) -> dict[str, SetStatistics]:
        return self._featurizer.take_results()


def featurize_sets(
    sets: Mapping[str, Sequence[ImageUnit]],
    extractor: ExtractorFile,
    options: Mapping[str, SetOptions],
    settings: FeatureSettings = FeatureSettings(),
    *,
    device: str = "cpu",
    workers: int = 0,
    ray_address: str | None = None,
    gpus_per_replica: float = 0.0,
    progress: bool = True,
) -> dict[str, SetStatistics]:
    """Statistics of each named image set (``{"real": units, "fake": units}``).

    ``workers`` 0 runs in this process on ``device``; W >= 1 runs W Ray replicas (local Ray, or
    the cluster at ``ray_address``; an already-initialised Ray session is used as is), each
    reserving ``gpus_per_replica`` GPUs (then computing on CUDA) and ``settings.threads`` CPUs.
    """
    if settings.batch_size < 1 or settings.threads < 1:
        raise InvalidInputError("--batch-size and --cpus-per-replica must be at least 1")
    if workers < 0 or gpus_per_replica < 0:
        raise InvalidInputError("--workers and --gpus-per-replica must be >= 0")
    slices = [Slice(side, unit) for side, units in sets.items() for unit in units]
    sizes = [s.unit.num_images for s in slices]
    total = None if None in sizes else sum(sizes)
    with tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        if workers == 0 and not ray_address:
            parts = [featurize_here(slices, extractor, options, settings, device, bar.update)]
        else:
            parts = _run_on_ray(slices, extractor, options, settings, max(workers, 1), ray_address, gpus_per_replica, bar)
    return merge_statistics(parts)


def _run_on_ray(
    slices: Sequence[Slice],
    extractor: ExtractorFile,
    options: Mapping[str, SetOptions],
    settings: FeatureSettings,
    workers: int,
    ray_address: str | None,
    gpus_per_replica: float,
    bar: Any,
) -> list[dict[str, SetStatistics]]:
    import ray

    from .ray_session import check_local_gpus, connect, forwarded_env, probe  # Ray: only when replicas run

    if ray_address:
        probe(ray_address)
    # A local Ray gets CPUs for every replica's threads (with GPUs it takes the machine's CPUs).
    started_ray = connect(ray_address, workers * settings.threads, gpus_per_replica)
    try:
        if started_ray and ray_address is None:
            check_local_gpus(gpus_per_replica)
        actor_options: dict[str, Any] = {"num_gpus": gpus_per_replica, "num_cpus": settings.threads, "max_restarts": 0}
        if ray_address is None:
            actor_options["runtime_env"] = {"env_vars": forwarded_env()}
        actor_class = ray.remote(**actor_options)(FeatureReplica)
        device = "cuda" if gpus_per_replica > 0 else "cpu"
        extractor_ref = ray.put(extractor)  # shipped once through the object store, not once per replica

        def spawn() -> Any:
            return actor_class.remote(extractor_ref, dict(options), settings, device)

        return _ReplicaPool(ray, spawn, workers, bar).run(slices)
    finally:
        if started_ray:
            ray.shutdown()


class _ReplicaPool:
    """Keeps every replica busy with a bounded number of slices; replaces replicas that die."""

    def __init__(self, ray: Any, spawn: Any, workers: int, bar: Any) -> None:
        self.ray, self.spawn, self.bar = ray, spawn, bar
        self.replicas: dict[int, Any] = {}
        self.done: dict[int, list[Slice]] = {}  # slices whose statistics live in that replica
        self.counted: dict[int, int] = {}  # images of those slices shown on the progress bar
        self.pending: dict[Any, tuple[Slice, int]] = {}  # object ref -> (slice, replica key)
        self.queue: deque[Slice] = deque()
        self.attempts: Counter[Slice] = Counter()
        self._next_key = 0
        for _ in range(workers):
            self._add_replica()

    def run(self, slices: Iterable[Slice]) -> list[dict[str, SetStatistics]]:
        self.queue.extend(slices)
        results = []
        while True:
            self._drain()
            collected = {key: replica.take_results.remote() for key, replica in self.replicas.items()}
            for key, ref in collected.items():
                try:
                    results.append(self._get(ref))
                    self.done[key], self.counted[key] = [], 0
                except self.ray.exceptions.RayActorError:
                    self._lose(key)
            if not self.queue:
                return results

    def _drain(self) -> None:
        self._fill()
        while self.pending:
            [ref], _ = self.ray.wait(list(self.pending), num_returns=1)
            work, key = self.pending.pop(ref)
            if key not in self.replicas:  # its replica was already lost; the slice is queued again
                continue
            try:
                images = self._get(ref)
            except self.ray.exceptions.RayActorError:
                self.pending[ref] = (work, key)  # _lose re-queues it with the replica's other slices
                self._lose(key)
            else:
                self.done[key].append(work)
                self.counted[key] += images
                self.bar.update(images)
            self._fill()

    def _fill(self) -> None:
        for key, replica in self.replicas.items():
            in_flight = sum(1 for _, k in self.pending.values() if k == key)
            while in_flight < SLICES_IN_FLIGHT and self.queue:
                work = self.queue.popleft()
                self.pending[replica.add.remote(work)] = (work, key)
                in_flight += 1

    def _lose(self, key: int) -> None:
        """A replica died: its statistics are gone, so every slice it held is done again elsewhere."""
        self.ray.kill(self.replicas.pop(key), no_restart=True)
        lost = self.done.pop(key) + [work for work, k in self.pending.values() if k == key]
        self.pending = {ref: (work, k) for ref, (work, k) in self.pending.items() if k != key}
        self.bar.update(-self.counted.pop(key))
        for work in lost:
            self.attempts[work] += 1
            if self.attempts[work] >= MAX_SLICE_ATTEMPTS:
                raise RuntimeError(f"{work.side} slice {work.unit.urls[0]} failed: its replica died {self.attempts[work]} times")
        self.queue.extendleft(reversed(lost))
        self._add_replica()

    def _add_replica(self) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        self.replicas[key], self.done[key], self.counted[key] = self.spawn(), [], 0

    def _get(self, ref: Any) -> Any:
        """ray.get; a user error raised in a replica comes back as itself (one-line message)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            cause = raised_error(err)
            if isinstance(cause, USER_ERRORS):
                raise cause from None
            raise RuntimeError(f"feature replica failed: {type(cause).__name__}: {first_line(cause)}") from None
