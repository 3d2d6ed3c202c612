"""Distributed featurisation for FID/KID/IS: image-set slices spread over Ray replicas.

Each replica (a Ray actor reserving ``gpus_per_replica`` GPUs and ``threads`` CPUs) loads the
feature extractor once, takes slices (a run of image files or one shard) from the driver, at most
``SLICES_IN_FLIGHT`` queued at a time, and folds their features into its own running
``SetStatistics``. Only those statistics leave the replica, once, at the end: per set a DxD
float64 matrix and a D vector (plus, with KID, at most ``kid_sample`` features; with IS, per split
a C vector). The driver merges them, so no process ever holds a set's features.

A replica that dies takes the statistics of every slice it had; the driver re-queues those
slices on a fresh replica, so each image still counts exactly once.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.storage.imagesets import ImageUnit, SetImage, iter_unit_images
from cytosynth.synth import InvalidInputError
from cytosynth.synth.cell_crops import CellCrop, cell_crops
from cytosynth.synth.extractors import FeatureExtractor, clean_resize, load_feature_extractor
from cytosynth.synth.metrics import (
    FeatureSample,
    FeatureStats,
    InceptionScoreStats,
    SetStatistics,
    sample_keys,
    split_of,
)

from .job import USER_ERRORS, first_line, raised_error

SLICES_IN_FLIGHT = 2  # per replica: one featurising while the next one's bytes arrive
MAX_SLICE_ATTEMPTS = 3  # a slice whose replica dies this many times fails the job
WHOLE_IMAGE = ""  # feature group of whole images; per-class crops are grouped by class name


@dataclass(frozen=True)
class ExtractorFile:
    """A feature extractor as its file's bytes: shipped once to every replica, loaded there."""

    kind: str  # see synth.extractors.EXTRACTOR_KINDS
    name: str  # the path the user gave, for messages
    data: bytes


def read_extractor_file(path: str, flag: str, inception: bool = False) -> ExtractorFile:
    """The extractor file at `path` (local or URL) as `cytosynth fid` reads it: clean-fid's
    Inception with `inception`, else TorchScript, or a torch.export program when it ends in .pt2.
    `flag` names the option in the error of a missing file."""
    if not storage.exists(path):
        hint = " (clean-fid's inception-2015-12-05.pt; nothing is downloaded)" if inception else ""
        raise InvalidInputError(f"{flag} {path}: no such file{hint}")
    kind = "inception" if inception else "export" if path.endswith(".pt2") else "torchscript"
    return ExtractorFile(kind, path, storage.get_bytes(path))


@dataclass(frozen=True)
class SetOptions:
    """What to gather for one image set besides its feature statistics."""

    per_class: bool = False  # also crops around annotated boxes, grouped by class
    kid_sample: int = 0  # keep a uniform sample of up to this many features for KID (0: none)
    is_splits: int = 0  # Inception Score splits (0: no IS)


@dataclass(frozen=True)
class FeatureSettings:
    """How every worker featurises: batch size, resize threads, crop size, and the seed that
    fixes which images the KID sample keeps and which IS split each image falls in."""

    batch_size: int = 32
    threads: int = 1  # CPU threads resizing images (and torch threads, under Ray) per worker
    seed: int = 0
    crop_size: int = 256  # per-class crops: the editor's 256x256 window centred on each box


@dataclass(frozen=True)
class Slice:
    """One unit of work: a slice of the image set called ``side``."""

    side: str
    unit: ImageUnit


class FeatureWorker:
    """Featurises slices and accumulates one ``SetStatistics`` per image set (runs anywhere)."""

    def __init__(
        self, extractor: FeatureExtractor, options: Mapping[str, SetOptions], settings: FeatureSettings = FeatureSettings()
    ) -> None:
        self.extractor, self.options, self.settings = extractor, dict(options), settings
        # Resizing (PIL, releases the GIL) runs on these threads while the next image decodes
        # and the extractor runs: on a GPU replica the CPU side is the bottleneck.
        self._resizer = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="clean-resize")
        self._stats: dict[str, SetStatistics] = {}

    def add(self, work: Slice) -> int:
        """Featurise one slice into its set's statistics; returns its number of images."""
        options = self.options[work.side]
        if work.side not in self._stats:
            self._stats[work.side] = self._empty(options)
        stats = self._stats[work.side]
        count, batch = 0, []
        for image in iter_unit_images(work.unit):
            count += 1
            batch.append((WHOLE_IMAGE, image.id, self._resizer.submit(clean_resize, image.image)))
            if options.per_class:
                batch.extend((crop.label, f"{image.id}#{crop.box}", self._resizer.submit(clean_resize, crop.image))
                             for crop in self._crops(image))
            while len(batch) >= self.settings.batch_size:
                self._featurise(stats, options, batch[: self.settings.batch_size])
                batch = batch[self.settings.batch_size :]
        if batch:
            self._featurise(stats, options, batch)
        return count

    def take_results(self) -> dict[str, SetStatistics]:
        """The statistics gathered so far, per set; the worker starts afresh."""
        results, self._stats = self._stats, {}
        return results

    def _empty(self, options: SetOptions) -> SetStatistics:
        dim = self.extractor.dim
        return SetStatistics(
            FeatureStats.empty(dim),
            kid_sample=FeatureSample(options.kid_sample) if options.kid_sample else None,
            inception=InceptionScoreStats.empty(options.is_splits, self.extractor.num_classes) if options.is_splits else None,
        )

    def _crops(self, image: SetImage) -> list[CellCrop]:
        annotation = image.annotation or {}
        boxes, labels = annotation.get("boxes", []), annotation.get("labels", [])
        return cell_crops(image.image, boxes, labels, self.settings.crop_size, where=image.id)

    def _featurise(self, stats: SetStatistics, options: SetOptions, batch: Sequence[tuple[str, str, Future]]) -> None:
        """One extractor call on a batch mixing whole images and crops; each group to its statistics."""
        groups = np.array([group for group, _, _ in batch])
        features, logits = self.extractor(torch.stack([resized.result() for _, _, resized in batch]))
        for label in np.unique(groups[groups != WHOLE_IMAGE]):
            selected = features[torch.from_numpy(groups == label)]
            stats.classes.setdefault(str(label), FeatureStats.empty(self.extractor.dim)).add(selected)
        whole = torch.from_numpy(groups == WHOLE_IMAGE)
        if not whole.any():
            return
        stats.images.add(features[whole])
        keys = sample_keys([image_id for group, image_id, _ in batch if group == WHOLE_IMAGE], self.settings.seed)
        if stats.kid_sample is not None:
            stats.kid_sample.add(keys, features[whole])
        if stats.inception is not None:
            stats.inception.add(logits[whole], split_of(keys, options.is_splits))


class FeatureReplica:
    """Body of the ``FeatureReplica`` Ray actor: one FeatureWorker, its extractor loaded once."""

    def __init__(self, extractor: ExtractorFile, options: Mapping[str, SetOptions], settings: FeatureSettings, device: str) -> None:
        loaded = load_feature_extractor(extractor.data, extractor.kind, extractor.name, device)
        self._worker = FeatureWorker(loaded, options, settings)

    def add(self, work: Slice) -> int:
        return self._worker.add(work)

    def take_results(self) -> dict[str, SetStatistics]:
        return self._worker.take_results()


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
            loaded = load_feature_extractor(extractor.data, extractor.kind, extractor.name, device)
            worker = FeatureWorker(loaded, options, settings)
            for work in slices:
                bar.update(worker.add(work))
            parts = [worker.take_results()]
        else:
            parts = _run_on_ray(slices, extractor, options, settings, max(workers, 1), ray_address, gpus_per_replica, bar)
    merged: dict[str, SetStatistics] = {}
    for part in parts:
        for side, stats in part.items():
            merged[side] = merged[side].merge(stats) if side in merged else stats
    return merged


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

    from .ray_session import check_local_gpus, connect, forwarded_env, probe

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
