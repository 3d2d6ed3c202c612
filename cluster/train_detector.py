"""train-detector: torchvision Faster R-CNN on cytosynth shards, real and synthetic mixed, on the harness.

Two uses, one job (`labels`):

- `"nilm"`: the paper's in-house cell detector (every cell one class, `num_classes=2`); its file is
  what `cytosynth generate --detector` loads to find the normal cells stage 2 edits.
- `"abnormal"`: a downstream detector of ASC-US, ASC-H, LSIL, HSIL (`num_classes=5`), the paper's
  Table II experiments (Faster R-CNN: SGD, lr 2e-4, batch 2, 20 epochs).

Data comes through `storage.detection_loader`'s dataset: streamed shards, split over ranks and
loader workers, real and synthetic mixed at `synthetic_fraction`. `train_detector(config)` runs
the whole job from a plain `DetectorTrainConfig`; the augmentation study calls it once per arm.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from cytosynth import storage
from cytosynth.synth import InvalidInputError
from cytosynth.synth.detector import build_fasterrcnn, save_detector
from cytosynth.synth.models import DETECTOR_FILE

from .training import TrainConfig, train

NUM_CLASSES = {"abnormal": 5, "nilm": 2}  # background included, as torchvision counts
SAMPLE_TILES = 4
SAMPLE_PX = 256
SCORE_THRESHOLD = 0.5  # boxes drawn on the progress grid, as generate's detector keeps them


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Everything one detector training run needs. `epochs`, when given, sets `steps` from the
    real set's size (shard stats): epochs x samples / (batch_size x workers)."""

    out: str
    real: str | None = None  # shards: a job output, a .tar, a brace pattern or a glob; or a list
    synthetic: str | None = None
    synthetic_fraction: float = 0.0  # share of synthetic samples in each epoch, in [0, 1]
    labels: str = "abnormal"  # "abnormal" (downstream detectors) | "nilm" (generate's cell detector)
    steps: int = 1000
    epochs: float | None = None
    batch_size: int = 2
    lr: float = 2e-4
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.0  # no clipping (torchvision's detection recipe)
    workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 2
    image_size: int = 1024  # Faster R-CNN resizes to this side (tiles are used at full resolution)
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    seed: int = 0
    resume: bool = True
    ray_address: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class DetectorTask:
    """The harness task (cluster.training) of `cytosynth train-detector`."""

    real: str | None
    synthetic: str | None = None
    synthetic_fraction: float = 0.0
    labels: str = "abnormal"
    image_size: int = 1024
    loader_workers: int = 2
    name: str = "train-detector"
    # fp32 always: in bf16, anchors and box regression lose up to 4 px at 1024 and BatchNorm's
    # fp32 buffers meet bf16 activations; torchvision's and mmdetection's recipes train in fp32.
    trains_in_bf16: ClassVar[bool] = False

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "loader_workers")}

    def validate(self) -> None:
        if self.labels not in NUM_CLASSES:
            raise InvalidInputError(f"unknown --labels {self.labels!r}; choose one of {', '.join(NUM_CLASSES)}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise InvalidInputError(f"--synthetic-fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.synthetic_fraction > 0 and not self.synthetic:
            raise InvalidInputError(f"--synthetic-fraction {self.synthetic_fraction} needs --synthetic shards")
        if self.synthetic_fraction < 1 and not self.real:
            raise InvalidInputError("--real shards are needed unless --synthetic-fraction is 1")
        if self.image_size < 32:
            raise InvalidInputError(f"--image-size must be at least 32, got {self.image_size}")
        for source in self.sources():
            shards = storage.resolve_shards(source)
            if count_boxes(shards, self.labels) == 0:
                raise InvalidInputError(f"{source} holds no {self.labels} boxes to train on")
            # Reading the first sample proves the shards decode (image and annotation JSON).
            next(storage.shard_detection_samples(shards[:1], self.labels), None)

    def sources(self) -> list[str]:
        f = self.synthetic_fraction
        return [s for s, used in ((self.real, f < 1), (self.synthetic, f > 0)) if used and s]

    def build(self, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = build_fasterrcnn(NUM_CLASSES[self.labels], min_size=self.image_size, max_size=self.image_size)
        model.to(device)
        return model, [p for p in model.parameters() if p.requires_grad]

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> Iterator[tuple[list, list]]:
        """(images, targets) batches of this rank's share, epoch after epoch."""
        f = self.synthetic_fraction
        loader = storage.detection_loader(
            self.real if f < 1 else None,
            self.synthetic if f > 0 else None,
            synthetic_fraction=f,
            labels=self.labels,
            rank=rank,
            world_size=world_size,
            seed=seed,
            batch_size=batch_size,
            num_workers=self.loader_workers,
        )
        for epoch in itertools.count():
            loader.dataset.set_epoch(epoch)
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise InvalidInputError(f"{', '.join(self.sources())}: too few samples for {world_size} workers")

    def loss(self, model: torch.nn.Module, batch: tuple[list, list]) -> torch.Tensor:
        weight = next(model.parameters())
        images = [image.to(weight.device, weight.dtype) for image in batch[0]]
        targets = [{k: v.to(weight.device) for k, v in target.items()} for target in batch[1]]
        return sum(model(images, targets).values())

    def sample_images(self, model: torch.nn.Module, seed: int) -> np.ndarray:
        """The first tiles of the first source with ground truth (white) and detections (green)."""
        samples = list(itertools.islice(storage.shard_detection_samples(self.sources()[0], self.labels), SAMPLE_TILES))
        weight = next(model.parameters())
        detections = model([image.to(weight.device, weight.dtype) for image, _ in samples])
        return np.stack([_drawn(image, target, found) for (image, target), found in zip(samples, detections)])

    def save(self, model: torch.nn.Module, out_url: str) -> str:
        with tempfile.TemporaryDirectory() as local:
            path = f"{local}/{DETECTOR_FILE}"
            save_detector(model, path)
            url = storage.join(out_url, DETECTOR_FILE)
            with open(path, "rb") as fh:
                storage.put_bytes(url, fh.read())
        return url


def count_boxes(shards: list[str], labels: str) -> int | None:
    """Boxes of a label set in `shards`, from their stats files alone; None if a stats file is missing."""
    total = 0
    for shard in shards:
        try:  # the stats JSON beside each committed shard (storage.shards' commit marker)
            stats = json.loads(storage.get_bytes(shard.removesuffix(".tar") + ".json"))
        except (storage.StorageError, ValueError):
            return None
        total += sum(stats.get("cells", {}).values()) + (stats.get("normal_cells", 0) if labels == "nilm" else 0)
    return total


def _drawn(image: torch.Tensor, target: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> np.ndarray:
    tile = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    for box in target["boxes"].tolist():
        draw.rectangle(box, outline=(255, 255, 255), width=2)
    keep = found["scores"] >= SCORE_THRESHOLD
    for box in found["boxes"][keep].float().tolist():
        draw.rectangle(box, outline=(0, 220, 90), width=2)
    return np.asarray(ImageOps.pad(tile, (SAMPLE_PX, SAMPLE_PX), color=(0, 0, 0)))


def detector_steps(config: DetectorTrainConfig) -> int:
    """`config.steps`, or the steps of `config.epochs` passes over the real set (synthetic on top)."""
    if config.epochs is None:
        return config.steps
    source = config.real if config.synthetic_fraction < 1 else config.synthetic
    samples = storage.count_samples(storage.resolve_shards(source))
    if samples is None:
        raise InvalidInputError(f"cannot count the samples of {source} (shards without stats); give --steps")
    if 0 < config.synthetic_fraction < 1:
        samples = samples / (1 - config.synthetic_fraction)  # the synthetic share comes on top
    return max(1, math.ceil(config.epochs * samples / (config.batch_size * config.workers)))


def train_detector(config: DetectorTrainConfig) -> dict[str, Any]:
    """Train (or resume) a detector; returns the summary (`artifact`: the safetensors URL)."""
    task = DetectorTask(
        config.real, config.synthetic, config.synthetic_fraction, config.labels, config.image_size, config.loader_workers
    )
    task.validate()  # before counting steps from the same shards
    training = TrainConfig(
        out=config.out,
        steps=detector_steps(config),
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        workers=config.workers,
        use_gpu=config.use_gpu,
        zero_stage=config.zero_stage,
        checkpoint_every=config.checkpoint_every,
        sample_every=config.sample_every,
        log_every=config.log_every,
        seed=config.seed,
        resume=config.resume,
        ray_address=config.ray_address,
        progress=config.progress,
    )
    return train(training, task)
