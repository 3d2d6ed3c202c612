"""Featurisation for FID/KID/IS: image-set slices folded into mergeable statistics, in one process.

A ``SetFeaturizer`` loads nothing itself: given an extractor, it takes slices (a run of image
files or one shard) and folds their features into one running ``SetStatistics`` per set: per
set a DxD float64 matrix and a D vector (plus, with KID, at most ``kid_sample`` features; with
IS, per split a C vector). Statistics of any split of a set merge to those of the whole
(``merge_statistics``), which is how `cluster/feature_replicas.py` spreads slices over Ray
replicas and how model selection (`training/model_selection.py`) scores a model in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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

WHOLE_IMAGE = ""  # feature group of whole images; per-class crops are grouped by class name


@dataclass(frozen=True)
class ExtractorFile:
    """A feature extractor as its file's bytes: shipped once to every replica, loaded there."""

    kind: str  # see synth.extractors.EXTRACTOR_KINDS
    name: str  # the path the user gave, for messages
    data: bytes

    def load(self, device: str | torch.device = "cpu") -> FeatureExtractor:
        """The extractor on `device`, checked (`synth.extractors.load_feature_extractor`)."""
        return load_feature_extractor(self.data, self.kind, self.name, device)


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


class SetFeaturizer:
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
        """The statistics gathered so far, per set; the featurizer starts afresh."""
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


def featurize_here(
    slices: Iterable[Slice], extractor: ExtractorFile, options: Mapping[str, SetOptions], settings: FeatureSettings,
    device: str, on_images: Callable[[int], Any],
) -> dict[str, SetStatistics]:
    """Every slice in this process on `device`, one extractor; `on_images(n)` as slices finish."""
    featurizer = SetFeaturizer(extractor.load(device), options, settings)
    for work in slices:
        on_images(featurizer.add(work))
    return featurizer.take_results()


def merge_statistics(parts: Iterable[Mapping[str, SetStatistics]]) -> dict[str, SetStatistics]:
    """One SetStatistics per set from the parts of any split of it (any order: see synth.metrics)."""
    merged: dict[str, SetStatistics] = {}
    for part in parts:
        for side, stats in part.items():
            merged[side] = merged[side].merge(stats) if side in merged else stats
    return merged
