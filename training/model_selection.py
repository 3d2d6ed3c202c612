"""Model selection by FID ("the best model is selected", paper Sec. IV-A): `--select-by fid`.

At every checkpoint step and at the final step the harness asks the task to score its model
(training.loop, `select`). finetune-normal draws N tiles from the current LoRA with fixed
seeds (the same noise at every step, so the scores compare), scores them by FID against a
held-out real set, and keeps the best:

    <out>/selection.jsonl               one row per scored step: {"step", "fid", "time"}
    <out>/selection/step_N/<artifact>   the model of each step that was the best when scored
    <out>/<artifact>                    at the end, the best step's model (saved directly when
                                        the final step is the best, else a copy of its file)

Resume: a row counts only up to the last complete checkpoint. Rows are written before their
step's checkpoint, so later rows belong to steps the resumed run trains again; the best of the
counted rows is remembered, and its file was written before that step's checkpoint was.

The real set's features are computed once per run on rank 0, with the project's FID code
(evaluation.features.SetFeaturizer, synth.metrics.FeatureStats / frechet_distance).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from cytosynth import storage
from cytosynth.storage.imagesets import list_image_units
from cytosynth.synth import InvalidInputError
from cytosynth.synth.extractors import FeatureExtractor, clean_preprocess
from cytosynth.synth.metrics import FeatureStats, frechet_distance

from cytosynth.evaluation.features import SetFeaturizer, SetOptions, Slice, read_extractor_file
from .train_config import SELECT_BY
from .checkpoints import latest_checkpoint

SELECTION_NAME = "selection.jsonl"
SELECTION_DIR = "selection"
EXTRACTOR_FLAG = "--select-feature-extractor"
FEATURE_BATCH = 8  # sampled tiles per extractor call


@dataclass(frozen=True)
class FidSelection:
    """The settings of `--select-by fid`; shipped to the workers with the task."""

    real: str | None  # held-out real tiles: a folder of images or shards, local or a URL
    extractor: str | None  # a feature extractor file, as `cytosynth fid --feature-extractor` reads
    count: int = 16  # tiles drawn per scored step
    by: str = "fid"

    def validate(self) -> None:
        """Driver, before anything is written: every setting, the extractor (loaded and probed),
        and the held-out set listed (featurised later, on rank 0)."""
        if self.by not in SELECT_BY:
            raise InvalidInputError(f"unknown --select-by {self.by!r}; choose one of {', '.join(SELECT_BY)}")
        if not self.real:
            raise InvalidInputError("--select-by fid needs --select-real URL: held-out real tiles to score against")
        if not self.extractor:
            raise InvalidInputError(f"--select-by fid needs {EXTRACTOR_FLAG} FILE (TorchScript or .pt2)")
        if self.count < 2:
            raise InvalidInputError(f"--select-count must be at least 2 (FID needs 2 tiles), got {self.count}")
        self.fingerprint  # noqa: B018 - loads and probes the extractor: an unreadable one fails here
        units = list_image_units(self.real)  # StorageError when it holds no images
        if sum(u.num_images or 2 for u in units) < 2:  # a shard's count is known only once read
            raise InvalidInputError(f"--select-real {self.real} holds 1 image; FID needs at least 2")

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What job.json records of the extractor: as `cytosynth fid` reports it."""
        file = read_extractor_file(self.extractor, EXTRACTOR_FLAG)
        loaded = file.load()
        return {"kind": file.kind, "sha256": loaded.sha256, "dim": loaded.dim}

    def record(self) -> dict[str, Any]:
        return {"select_by": self.by, "select_count": self.count, "select_real": self.real,
                "select_feature_extractor": {**self.fingerprint, "file": self.extractor}}

    def scorer(self, device: torch.device) -> "FidScorer":
        """Built on first use, then kept: the real set is featurised once per run (rank 0)."""
        if "_scorer" not in self.__dict__:  # frozen dataclass: cache beside the fields
            self.__dict__["_scorer"] = FidScorer.build(self, device)
        return self.__dict__["_scorer"]


@dataclass
class FidScorer:
    """A loaded extractor and the held-out set's feature statistics."""

    extractor: FeatureExtractor
    real: FeatureStats

    @classmethod
    def build(cls, selection: FidSelection, device: torch.device) -> "FidScorer":
        file = read_extractor_file(selection.extractor, EXTRACTOR_FLAG)
        extractor = file.load(device)
        worker = SetFeaturizer(extractor, {"real": SetOptions()})
        for unit in list_image_units(selection.real):
            worker.add(Slice("real", unit))
        stats = worker.take_results().get("real")
        count = stats.images.count if stats else 0
        if count < 2:
            raise InvalidInputError(f"--select-real {selection.real} holds {count} images; FID needs at least 2")
        return cls(extractor, stats.images)

    def fid(self, tiles: np.ndarray) -> float:
        """FID of uint8 tiles (N, H, W, 3) against the real set, clean-fid preprocessing."""
        fake = FeatureStats.empty(self.extractor.dim)
        for start in range(0, len(tiles), FEATURE_BATCH):
            features, _ = self.extractor(clean_preprocess(tiles[start : start + FEATURE_BATCH]))
            fake.add(features)
        return frechet_distance(self.real, fake)


# --------------------------------------------------------------------------- the record of scores


def selection_url(out: str) -> str:
    return storage.join(out, SELECTION_NAME)


def step_url(out: str, step: int) -> str:
    """Where the model of a step that became the best is saved."""
    return storage.join(out, SELECTION_DIR, f"step_{step:06d}")


def read_selection(out: str) -> list[dict[str, Any]]:
    """The rows of `<out>/selection.jsonl` ([] if there is none yet)."""
    url = selection_url(out)
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.get_bytes(url).decode().splitlines() if line.strip()]


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The lowest score; the earliest step on a tie. A score of None (not finite) ranks last."""
    return min(rows, key=lambda r: (_rank(r), r["step"]), default=None)


def _rank(row: dict[str, Any]) -> float:
    return math.inf if row["fid"] is None else row["fid"]


def record_score(out: str, step: int, final: bool, score: float, artifact: str) -> dict[str, Any]:
    """Record `score` for `step` and say what to keep: the harness's `select` verdict.

    With "save_to", the model is the best so far and must be saved there (the final step's
    straight to the artifact); otherwise, at the final step, the best step's file is copied to
    the artifact here. The other keys go into `_SUCCESS`.
    """
    counted = [r for r in read_selection(out) if r["step"] <= latest_checkpoint(out)]
    previous = best_row(counted)
    row = {"step": step, "fid": score if math.isfinite(score) else None, "time": round(time.time(), 3)}
    storage.put_bytes(selection_url(out), "".join(json.dumps(r) + "\n" for r in [*counted, row]).encode())
    is_best = previous is None or _rank(row) < _rank(previous)
    best = row if is_best else previous
    artifact_url = storage.join(out, artifact)
    verdict = {"artifact": artifact_url, "best_step": best["step"], "best_fid": best["fid"],
               "selection": selection_url(out)}
    if is_best:
        return {**verdict, "save_to": out if final else step_url(out, step)}
    if final:
        storage.put_bytes(artifact_url, storage.get_bytes(storage.join(step_url(out, best["step"]), artifact)))
    return verdict
