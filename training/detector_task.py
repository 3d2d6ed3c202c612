"""train-detector: torchvision Faster R-CNN or RetinaNet on cytosynth shards, real and synthetic mixed, on the harness.

Two uses, one job (`labels`):

- `"nilm"`: the paper's in-house cell detector (every cell one class, `num_classes=2`); its file is
  what `cytosynth generate --detector` loads to find the normal cells stage 2 edits.
- `"abnormal"`: a downstream detector of ASC-US, ASC-H, LSIL, HSIL (`num_classes=5`), the paper's
  Table II experiments (Faster R-CNN: SGD, lr 2e-4; RetinaNet: SGD, lr 1e-3; batch 2, 20 epochs,
  ImageNet-pretrained ResNet-50: `backbone_weights`, a safetensors file by path or URL, never downloaded).

Data comes through `storage.detection_loader`'s dataset: streamed shards, split over ranks and
loader workers, real and synthetic mixed at `synthetic_fraction`. `detector_task(config)` is the
task of a plain `DetectorTrainConfig`, whose steps and lr the task settles from its data
(`DetectorTask.settle`); the augmentation study trains one per arm.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from cytosynth import storage
from cytosynth.synth import InvalidInputError
from cytosynth.synth.detector import build_detector, check_arch, read_backbone_weights, save_detector
from cytosynth.synth.models import DETECTOR_FILE

from .train_config import DEFAULT_LR, NUM_CLASSES, PAPER_EPOCHS, DetectorTrainConfig

SAMPLE_TILES = 4
SAMPLE_PX = 256
SCORE_THRESHOLD = 0.5  # boxes drawn on the progress grid, as generate's detector keeps them


@dataclass(frozen=True)
class DetectorTask:
    """The harness task (training.loop) of `cytosynth train-detector`."""

    real: str | None
    synthetic: str | None = None
    synthetic_fraction: float = 0.0
    labels: str = "abnormal"
    image_size: int = 1024
    loader_workers: int = 2
    arch: str = "fasterrcnn"
    roi_samples: int = 512
    # Read by every worker itself (a path all nodes see, or an object-store URL) and checked against
    # the driver's fingerprint; never recorded, since a URL may carry credentials.
    backbone_weights: str | None = field(default=None, repr=False)
    backbone_sha256: str | None = None  # job.json's name for the backbone file
    name: str = "train-detector"
    # fp32 always: in bf16, anchors and box regression lose up to 4 px at 1024 and BatchNorm's
    # fp32 buffers meet bf16 activations; torchvision's and mmdetection's recipes train in fp32.
    trains_in_bf16: ClassVar[bool] = False

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "loader_workers", "backbone_weights")}

    def validate(self) -> None:
        check_arch(self.arch)
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
        if self.roi_samples < 1:
            raise InvalidInputError(f"--roi-samples must be at least 1, got {self.roi_samples}")
        sides = []  # (height, width) of each source's first tile: real, then synthetic
        for source in self.sources():
            shards = storage.resolve_shards(source)
            if count_boxes(shards, self.labels) == 0:
                raise InvalidInputError(f"{source} holds no {self.labels} boxes to train on")
            # Reading the first sample proves the shards decode (image and annotation JSON).
            first = next(storage.shard_detection_samples(shards[:1], self.labels), None)
            if first is not None:
                sides.append(tuple(first[0].shape[-2:]))
        if len(set(sides)) > 1:
            warn_scale_mismatch(*sides, self.image_size)

    def settle(self, config: DetectorTrainConfig) -> DetectorTrainConfig:
        """The harness's steps and lr, after `validate` (the steps of --epochs are counted from the
        same shards' stats): a DetectorTrainConfig is then the harness's TrainConfig."""
        lr = DEFAULT_LR[self.arch] if config.lr is None else config.lr
        return replace(config, steps=detector_steps(config), lr=lr)

    def sources(self) -> list[str]:
        f = self.synthetic_fraction
        return [s for s, used in ((self.real, f < 1), (self.synthetic, f > 0)) if used and s]

    def build(self, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """From scratch, or on the ImageNet backbone with frozen BatchNorm and conv1 + layer1 frozen
        (torchvision's pretrained recipe); the trainable parameters are those left requiring grad."""
        backbone = None
        if self.backbone_weights:
            backbone, sha256 = read_backbone(self.backbone_weights)
            if self.backbone_sha256 and sha256 != self.backbone_sha256:
                raise InvalidInputError(f"backbone weights changed during the run (sha256 {sha256}, "
                                        f"expected {self.backbone_sha256})")
        # RetinaNet has no box head to sample proposals for.
        heads = {"box_batch_size_per_image": self.roi_samples} if self.arch == "fasterrcnn" else {}
        model = build_detector(self.arch, NUM_CLASSES[self.labels], backbone_state=backbone,
                               min_size=self.image_size, max_size=self.image_size, **heads)
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


def warn_scale_mismatch(real_side: tuple[int, int], synthetic_side: tuple[int, int], image_size: int) -> None:
    """Real and synthetic tiles of different sides are both resized to --image-size, so their cells
    reach the detector at different scales: a warning, not an error, since tiles of different
    magnifications may need exactly that."""
    ratio = max(synthetic_side) / max(real_side)  # torchvision scales a tile by image_size / its longer side
    print(f"warning: --real tiles are {real_side[1]}x{real_side[0]} and --synthetic tiles "
          f"{synthetic_side[1]}x{synthetic_side[0]}; both are resized to --image-size {image_size}, so a real "
          f"cell reaches the detector {ratio:.2g}x the size of a synthetic cell of the same magnification",
          file=sys.stderr)


def count_boxes(shards: list[str], labels: str) -> int | None:
    """Boxes of a label set in `shards`, from their stats files alone; None if a stats file is missing."""
    total = 0
    for shard in shards:
        try:
            stats = storage.marker_of(shard)
        except storage.StorageError:
            return None
        if stats is None:
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


def read_backbone(url: str) -> tuple[dict[str, torch.Tensor], str]:
    """The ResNet-50 state dict at `url` (a path or fsspec URL; safetensors, never pickle) and the
    sha256 prefix of its bytes (as synth.models.fingerprint names weights)."""
    name = storage.redact(url)  # no URL userinfo in messages
    try:
        data = storage.get_bytes(url)
    except storage.StorageError as err:
        raise InvalidInputError(f"--backbone-weights: {err}") from None
    return read_backbone_weights(data, name), hashlib.sha256(data).hexdigest()[:16]


def backbone_fingerprint(url: str | None) -> str | None:
    """Check the backbone file on the driver, before anything is written; its fingerprint."""
    return None if url is None else read_backbone(url)[1]


def detector_steps(config: DetectorTrainConfig) -> int:
    """`config.steps`, or the steps of `config.epochs` (default 20) passes over the real set
    (synthetic on top)."""
    if config.steps is not None and config.epochs is not None:
        raise InvalidInputError("give --steps or --epochs, not both")
    if config.steps is not None:
        return config.steps
    epochs = PAPER_EPOCHS if config.epochs is None else config.epochs
    if not epochs > 0:
        raise InvalidInputError(f"--epochs must be positive, got {epochs}")
    source = config.real if config.synthetic_fraction < 1 else config.synthetic
    samples = storage.count_samples(storage.resolve_shards(source))
    if samples is None:
        raise InvalidInputError(f"cannot count the samples of {source} (shards without stats) for "
                                f"{epochs:g} epochs; give --steps")
    if 0 < config.synthetic_fraction < 1:
        samples = samples / (1 - config.synthetic_fraction)  # the synthetic share comes on top
    return max(1, math.ceil(epochs * samples / (config.batch_size * config.workers)))


def detector_task(config: DetectorTrainConfig) -> DetectorTask:
    """The task of a train-detector config: the config's fields of the same names, and the
    backbone file checked and fingerprinted on the driver."""
    check_arch(config.arch)
    settings = {f.name: getattr(config, f.name) for f in fields(DetectorTask) if hasattr(config, f.name)}
    return DetectorTask(**settings, backbone_sha256=backbone_fingerprint(config.backbone_weights))
