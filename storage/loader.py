"""Detector training and evaluation data: cytosynth shards (and COCO sets) as torchvision inputs.

API (``from cytosynth.storage import ...``; importing it pulls in torch, the rest of storage does not)::

    loader = detection_loader(
        "s3://data/real",                    # real shards: anything shard_urls() takes, or a list
        "s3://data/synthetic",               # synthetic shards (optional)
        synthetic_fraction=0.3,              # share of synthetic samples in the epoch, in [0, 1]
        labels="abnormal",                   # or "nilm"
        batch_size=2, num_workers=4,         # rank/world_size default from $RANK/$WORLD_SIZE or torch.distributed
    )
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)      # new shard order and shuffle, same on every rank
        for images, targets in loader:       # lists: CHW float [0, 1]; {"boxes", "labels", "image_id"}
            loss = sum(model(images, targets).values())

- ``ShardDetectionDataset`` is the IterableDataset behind it; ``collate_detection`` its collate
  function; ``detection_target`` / ``to_detection_input`` turn one sample into model inputs.
- ``shard_detection_samples`` and ``coco_detection_samples`` read a labelled set once, in order,
  in this process (evaluation), from shards or from a COCO JSON plus an image folder;
  ``resolve_shards`` / ``count_samples`` list a shard set and count it from its stats.

Each item is ``(image, target)``: ``image`` a float32 CHW tensor in [0, 1]; ``target`` holds
``boxes`` (float32 [N, 4], xyxy pixels), ``labels`` (int64 [N]) and ``image_id`` (int64, the
tile index). Label sets (``LABEL_SETS``):

- ``"abnormal"``: the edited cells, labels = the fixed category ids ASC-US 1, ASC-H 2, LSIL 3,
  HSIL 4 (``num_classes=5`` for torchvision, background included).
- ``"nilm"``: every cell as class 1 (``num_classes=2``), for the in-house cell detector of
  stage 2: the ``normal_boxes`` and the edited cells too. An edited cell sits where a detected
  NILM cell was and is still a cell with an exact box; leaving it out would label a cell as
  background, teaching the detector to miss exactly the atypical cells real tiles also hold.
- ``"all"``: the abnormal ids 1-4 plus the ``normal_boxes`` as NILM 5 (``num_classes=6``).

Splitting. One epoch of one source is split over ``slots = world_size x num_workers`` readers
(slot = rank x num_workers + worker id). Shards are permuted per epoch with the same seed on every
rank; the first ``len(shards) // slots * slots`` go whole to the slots round-robin; the remaining
shards (fewer than ``slots``) are read by every slot, which keeps every ``slots``-th sample. So every
sample is yielded exactly once per epoch, none lost and none doubled, whatever the shard count;
per-slot counts differ only by the sizes of the whole shards each got (equal shards: at most one
sample apart).

Mixing. With ``0 < synthetic_fraction < 1`` the real source is the epoch: every real sample exactly
once per epoch, as above. Synthetic samples are drawn alongside, ``round(n x f / (1 - f))`` after
the n-th real sample of a slot, so the synthetic share of the epoch is ``f`` to within half a sample
per slot. The synthetic stream of a slot walks its share of the synthetic shards in a fresh
permutation per epoch and cycles when it runs out: synthetic samples are drawn, not enumerated
(a sample repeats within an epoch only when the epoch needs more than the synthetic set holds).
``f = 0`` reads real only, ``f = 1`` synthetic only (then the synthetic source is the epoch).

Shuffling: shard order per epoch plus a buffer of ``shuffle_buffer`` encoded samples per slot
(webdataset's shuffle), so memory per worker is about ``shuffle_buffer`` encoded tiles. Order is a
function of (seed, epoch, rank, worker count); ``set_epoch`` before each epoch, as with
DistributedSampler (with ``persistent_workers=True`` the workers would keep the old epoch).
"""

from __future__ import annotations

import itertools
import math
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .classes import LABEL_SETS, NORMAL_LABEL, check_label_set, label_categories, labelled_boxes
from .coco import read_coco_images
from .errors import StorageError, describe, storage_error
from .reader import decode_sample, open_shard, shard_urls
from .imagesets import read_image
from .shards import marker_of
from .tars import iter_tar_samples

__all__ = [
    "LABEL_SETS", "ShardDetectionDataset", "coco_detection_samples", "collate_detection", "count_samples",
    "detection_categories", "detection_loader", "detection_target", "resolve_shards", "shard_detection_samples",
    "split_shards", "to_detection_input",
]

Sources = str | Sequence[str]
Transform = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
_REAL, _SYNTHETIC = 0, 1  # stream tags in the seeds


def detection_categories(labels: str = "abnormal") -> dict[int, str]:
    """Category id -> name of a label set: the four abnormal classes, ``{1: "NILM"}``, or both (NILM 5)."""
    return label_categories(labels)


def _check_label_set(labels: str) -> None:
    check_label_set(labels)


def detection_target(annotation: Mapping[str, Any], labels: str = "abnormal") -> dict[str, torch.Tensor]:
    """torchvision detection target of a sample JSON (module docstring: label sets)."""
    boxes, ids = labelled_boxes(annotation, labels)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(ids, dtype=torch.int64),
        "image_id": torch.tensor(int(annotation["tile_index"]), dtype=torch.int64),
    }


def to_detection_input(sample: Mapping[str, Any], labels: str = "abnormal") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A decoded sample (``read_samples`` dict) -> ``(CHW float image in [0, 1], target)``."""
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1).contiguous().float().div_(255)
    return image, detection_target(sample["json"], labels)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images differ in size and box counts differ: keep lists, as torchvision detectors take them."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def resolve_shards(source: Sources) -> list[str]:
    """Shard URLs of a source (a URL ``shard_urls`` takes, or a list of them); StorageError if none."""
    urls = [source] if isinstance(source, str) else list(source)
    shards = [s for url in urls for s in shard_urls(url)]
    if not shards:
        raise StorageError(f"no committed shards found at {', '.join(map(str, urls)) or '(no URL)'}")
    return shards


def count_samples(shards: Sequence[str]) -> int | None:
    """Samples in ``shards`` from their stats JSON (commit markers), no tar read; None if one lacks it."""
    total = 0
    for shard in shards:
        try:
            stats = marker_of(shard)
            total += int(stats["tiles"])
        except (StorageError, KeyError, TypeError, ValueError):
            return None  # a bare .tar written by other tools (no marker): the count is unknown, not an error
    return total


def split_shards(shards: Sequence[str], slot: int, slots: int) -> tuple[list[str], list[str]]:
    """``(whole, shared)``: the shards ``slot`` reads whole, and the remainder every slot reads,
    keeping every ``slots``-th sample (module docstring: splitting)."""
    whole = len(shards) // slots * slots
    return list(shards[slot:whole:slots]), list(shards[whole:])


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard, tagged with ``__url__``; a bad shard is a StorageError."""
    try:
        with open_shard(url) as stream:
            for raw in iter_tar_samples(stream):
                yield {**raw, "__url__": url}
    except StorageError:
        raise
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise storage_error("read shard", url, exc) from exc


def _decoded(raw: Mapping[str, Any], labels: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    try:
        return to_detection_input(decode_sample(raw), labels)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"cannot decode sample {raw.get('__key__')} of {raw['__url__']}: {describe(exc)}") from None


def shard_detection_samples(
    source: Sources, labels: str = "abnormal"
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every sample of a shard set once, in shard order, in this process (evaluation).
    The shard list is resolved now, so a missing set fails here rather than at the first item."""
    _check_label_set(labels)
    shards = resolve_shards(source)
    return (_decoded(raw, labels) for url in shards for raw in _raw_samples(url))


def coco_detection_samples(
    annotations_url: str,
    images_url: str | None = None,
    labels: str = "abnormal",
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every image of a COCO detection set, in the JSON's order, as detection inputs.

    Categories are matched by name (case-insensitive) to ASC-US, ASC-H, LSIL, HSIL and NILM; others
    (bacteria, other cell types) are ignored, as the paper filters public sets. Crowd annotations are
    skipped. Images are read from ``images_url`` (default: the JSON's folder) + ``file_name``; image
    ids become ``image_id``. The JSON is read now: a missing or malformed file is a one-line
    StorageError here; an unreadable or wrongly sized image one when its turn comes.
    """
    _check_label_set(labels)
    images = read_coco_images(annotations_url, images_url)

    def samples() -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        for info in images:
            image = read_image(info.url)
            if image.shape[:2] != (info.height, info.width):
                raise StorageError(
                    f"{info.url} is {image.shape[1]}x{image.shape[0]} but {annotations_url} says {info.width}x{info.height}"
                )
            cells = list(zip(info.boxes, info.labels))
            annotation = {
                "tile_index": info.id,
                "boxes": [box for box, name in cells if name != NORMAL_LABEL],
                "labels": [name for _, name in cells if name != NORMAL_LABEL],
                "normal_boxes": [box for box, name in cells if name == NORMAL_LABEL],
            }
            yield to_detection_input({"image": image, "json": annotation}, labels)

    return samples()


class ShardDetectionDataset(IterableDataset):
    """Streaming, shuffled detection samples from real and synthetic shards, split across
    DataLoader workers and distributed ranks (module docstring: splitting, mixing, shuffling).

    ``real`` / ``synthetic``: URLs ``shard_urls`` takes (a job output, a ``.tar``, a brace pattern
    or a glob) or lists of them; shard lists are resolved once, here. ``rank`` / ``world_size``
    default to $RANK / $WORLD_SIZE, else torch.distributed's when it is initialised, else 0 / 1. ``transform(image, target)``
    runs last (augmentation). Bad arguments raise ValueError; missing shards StorageError.
    """

    def __init__(
        self,
        real: Sources | None,
        synthetic: Sources | None = None,
        *,
        synthetic_fraction: float = 0.0,
        labels: str = "abnormal",
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        transform: Transform | None = None,
    ) -> None:
        super().__init__()
        fraction = float(synthetic_fraction)
        if not 0.0 <= fraction <= 1.0:  # also refuses NaN
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        if fraction > 0 and synthetic is None:
            raise ValueError(f"synthetic_fraction={fraction} needs synthetic shards")
        if fraction < 1 and real is None:
            raise ValueError("real shards are needed unless synthetic_fraction is 1")
        _check_label_set(labels)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.rank, self.world_size = _distributed_place(rank, world_size)
        self.synthetic_fraction, self.labels, self.seed = fraction, labels, int(seed)
        self.shuffle, self.shuffle_buffer, self.transform = shuffle, shuffle_buffer, transform
        self.real_shards = resolve_shards(real) if fraction < 1 else []
        self.synthetic_shards = resolve_shards(synthetic) if fraction > 0 else []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call on every rank)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        f = self.synthetic_fraction
        if f == 1:
            stream = self._slot_stream(self.synthetic_shards, _SYNTHETIC, 0, slot, slots)
        elif f == 0:
            stream = self._slot_stream(self.real_shards, _REAL, 0, slot, slots)
        else:
            real = self._slot_stream(self.real_shards, _REAL, 0, slot, slots)
            stream = _mix(real, self._cycled_synthetic(slot, slots), f / (1 - f))
        for raw in stream:
            image, target = _decoded(raw, self.labels)
            yield self.transform(image, target) if self.transform else (image, target)

    def _slot_stream(self, shards: list[str], tag: int, cycle: int, slot: int, slots: int) -> Iterator[dict]:
        """This slot's undecoded samples of one pass over ``shards``, shuffled."""
        if self.shuffle:  # the same permutation on every rank and worker: it decides who reads what
            order = np.random.default_rng([self.seed, self.epoch, tag, cycle]).permutation(len(shards))
            shards = [shards[i] for i in order]
        whole, shared = split_shards(shards, slot, slots)
        stream = _chain(
            (raw for url in whole for raw in _raw_samples(url)),
            (raw for i, raw in enumerate(r for url in shared for r in _raw_samples(url))
             if i % slots == slot),
        )
        if not self.shuffle:
            return stream
        seed = np.random.default_rng([self.seed, self.epoch, tag, cycle, slot, slots]).integers(2**63)
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(int(seed)))(stream)

    def _cycled_synthetic(self, slot: int, slots: int) -> Iterator[dict]:
        """Endless synthetic draws for one slot: its share, re-permuted each time round."""
        for cycle in itertools.count():
            empty = True
            for raw in self._slot_stream(self.synthetic_shards, _SYNTHETIC, cycle, slot, slots):
                empty = False
                yield raw
            if empty:
                raise StorageError(
                    f"synthetic shards hold too few samples for {slots} readers (ranks x workers); "
                    f"{self.synthetic_shards[0]} and {len(self.synthetic_shards) - 1} more"
                )


def _chain(*streams: Iterable[dict]) -> Iterator[dict]:
    for stream in streams:
        yield from stream


def _mix(real: Iterator[dict], synthetic: Iterator[dict], ratio: float) -> Iterator[dict]:
    """All of ``real``; after the n-th real sample, synthetic ones up to ``round(n x ratio)`` in all."""
    drawn = 0
    for n, sample in enumerate(real, start=1):
        yield sample
        due = math.floor(n * ratio + 0.5)
        while drawn < due:
            yield next(synthetic)
            drawn += 1


def _distributed_place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    # webdataset's own rule ($RANK / $WORLD_SIZE, as torchrun and Ray Train set them, else the
    # initialised process group, else 0 / 1), so this dataset and webdataset_pipeline agree.
    env_rank, env_world_size, _, _ = wds.utils.pytorch_worker_info()
    rank = env_rank if rank is None else rank
    world_size = env_world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return rank, world_size


def detection_loader(
    real: Sources | None,
    synthetic: Sources | None = None,
    *,
    batch_size: int = 2,
    num_workers: int = 2,
    pin_memory: bool = False,
    **dataset_options: Any,
) -> DataLoader:
    """A DataLoader of ``(images, targets)`` batches over a ``ShardDetectionDataset``
    (``dataset_options`` go to it). Call ``loader.dataset.set_epoch(e)`` before each epoch."""
    dataset = ShardDetectionDataset(real, synthetic, **dataset_options)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers must see set_epoch's new epoch
    )
