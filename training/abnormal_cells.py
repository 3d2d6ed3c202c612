"""finetune-abnormal: train the Abnormal Cell Synthesizer (paper Sec. III-C and IV-A) on the harness.

The ACS is the SD1.5 UNet turned into a 9-channel inpainting UNet with GLIGEN gated
self-attention (`synth.acs_training`: what learns and why). Each step takes 256x256 crops centred
on annotated abnormal cells (`synth.cell_crops`), masks the box out of the crop's latent, and
regresses the noise (the LDM loss) conditioned on "A cervical cytopathological image with <cls>
cell" and on the (box, <cls>) grounding token. The paper: 6,815 crops from 3,000 real 1024x1024
tiles, AdamW, lr 1e-4, batch 4, 50k iterations.

Data is cytosynth shards or a COCO detection JSON with its image folder, local or on `s3://`:
indexed once on the driver from metadata (`storage.annotated`), then streamed tile by tile on
each worker. The output is `<out>/acs_unet/`, a diffusers `UNet2DConditionModel` folder
(safetensors) that `cytosynth generate --acs-unet` and `UNet2DConditionModel.from_pretrained` load.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import webdataset as wds
from diffusers import DDIMScheduler

from cytosynth import storage
from cytosynth.storage.annotated import coco_index, entries_for_rank, read_tiles, shard_index
from cytosynth.synth import ABNORMAL_CLASSES, InvalidInputError
from cytosynth.synth.abnormal import embed_classes
from cytosynth.synth.acs_training import GROUNDING_DROPOUT, PROMPT_DROPOUT, ACSTrainingModel, trained_state
from cytosynth.synth.cell_crops import CellCrop, CropBatch, cell_crops, check_annotation, crop_batches
from cytosynth.synth.models import SD_COMPONENTS, acs_unet_from_base
from cytosynth.synth.paste import paste_back
from cytosynth.synth.settings import SynthesisSettings
from cytosynth.synth.cell_selection import BOX_SIZES, CROP_SIZE, box_fits
from cytosynth.synth.ldm_training import load_sd_components, noise_scheduler

ACS_DIR = "acs_unet"
INIT_SEED = 0  # the new GLIGEN layers start the same on every worker and every run


@dataclass(frozen=True)
class AbnormalCellTask:
    """The harness task (training.loop) of `cytosynth finetune-abnormal`."""

    data: str | None = None  # cytosynth shards with abnormal boxes
    coco: str | None = None  # or a COCO detection JSON...
    images: str | None = None  # ...and its image folder (default: the JSON's folder)
    model_dir: str | None = None  # a diffusers SD1.5 folder or URL; None: the preset's random weights
    preset: str = "tiny"
    shuffle_buffer: int = 64  # crops per worker mixed before batching
    sample_count: int = 4  # crops in each samples/ grid, each shown as all four classes
    sample_steps: int = 25
    prompt_dropout: float = PROMPT_DROPOUT  # CFG training: the empty prompt instead of the class prompt
    grounding_dropout: float = GROUNDING_DROPOUT  # CFG training: the grounding token hidden (masks = 0)
    box_size: str = BOX_SIZES[0]  # "cell": the abnormal cell's own box (the paper); "normal": grown to a normal cell's
    name: str = "finetune-abnormal"
    trains_in_bf16: ClassVar[bool] = True

    def record(self) -> dict[str, Any]:
        keep = ("data", "coco", "images", "model_dir", "preset", "prompt_dropout", "grounding_dropout", "box_size")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, "crop_size": CROP_SIZE}

    def validate(self) -> None:
        if (self.data is None) == (self.coco is None):
            raise InvalidInputError("give the training data as either --data SHARDS or --coco FILE.json")
        if self.images is not None and self.coco is None:
            raise InvalidInputError("--images is the image folder of --coco; shards hold their own images")
        for option in ("shuffle_buffer", "sample_count", "sample_steps"):
            if getattr(self, option) < 1:
                raise InvalidInputError(f"--{option.replace('_', '-')} must be at least 1")
        if self.box_size not in BOX_SIZES:
            raise InvalidInputError(f"--box-size must be one of {', '.join(BOX_SIZES)}, got {self.box_size!r}")
        for option in ("prompt_dropout", "grounding_dropout"):
            if not 0.0 <= getattr(self, option) < 1.0:
                raise InvalidInputError(f"--{option.replace('_', '-')} must be in [0, 1), got {getattr(self, option)}")
        if self.model_dir is not None:
            for part in SD_COMPONENTS:
                if not storage.exists(storage.join(self.model_dir, part)):
                    raise InvalidInputError(f"model {self.model_dir}: missing the {part}/ folder of a diffusers SD1.5 model")
        if not self.entries:
            raise InvalidInputError(
                f"no abnormal cell boxes ({', '.join(ABNORMAL_CLASSES)}) that fit a {CROP_SIZE}x{CROP_SIZE} crop "
                f"in {self.data or self.coco}"
            )

    @cached_property
    def entries(self) -> list[dict[str, Any]]:
        """The tiles to crop, each keeping only boxes that fit a crop. Read once, on the driver
        (`validate`); the list travels to the workers with the task."""
        if self.data is not None:
            entries = shard_index(self.data)
        else:
            entries = coco_index(self.coco, self.images)
        kept = []
        for entry in entries:
            check_annotation(entry["width"], entry["height"], entry["boxes"], entry["labels"], _where(entry))
            cells = [(b, c) for b, c in zip(entry["boxes"], entry["labels"]) if box_fits(b, CROP_SIZE)]
            if cells:
                kept.append({**entry, "boxes": [b for b, _ in cells], "labels": [c for _, c in cells]})
        return kept

    def crop_counts(self) -> dict[str, int]:
        """Training crops per class (one per kept box)."""
        counts = Counter(label for entry in self.entries for label in entry["labels"])
        return {c: counts.get(c, 0) for c in ABNORMAL_CLASSES}

    def build(self, device: torch.device) -> tuple[ACSTrainingModel, list[torch.nn.Parameter]]:
        sd = load_sd_components(self.model_dir, self.preset)
        embeddings = embed_classes(sd.tokenizer, sd.text_encoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model, trainable = ACSTrainingModel.from_base(
                sd.unet, sd.vae, embeddings, noise_scheduler(sd.scheduler_config),
                prompt_dropout=self.prompt_dropout, grounding_dropout=self.grounding_dropout,
            )
        return model.to(device), trainable

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> Iterator[CropBatch]:
        """Full batches of this worker's crops, endlessly: its tiles of each epoch (a fresh split
        and order per epoch), cropped, mixed in a shuffle buffer."""
        shuffle_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        mix = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed))
        return crop_batches(mix(self._crops(rank, world_size, seed)), batch_size)

    def _crops(self, rank: int, world_size: int, seed: int) -> Iterator[CellCrop]:
        for epoch in itertools.count():
            mine = entries_for_rank(self.entries, rank, world_size, seed=seed, epoch=epoch)
            if not mine:
                raise InvalidInputError(f"{len(self.entries)} tiles with abnormal cells are too few for {world_size} workers")
            rng = np.random.default_rng([seed, rank, epoch])
            for tile in read_tiles(mine):
                grow_to = self._normal_cells_for(tile, rng) if self.box_size == "normal" else None
                yield from cell_crops(tile["image"], tile["boxes"], tile["labels"], where=_where(tile), grow_to=grow_to)

    @staticmethod
    def _normal_cells_for(tile: dict[str, Any], rng: np.random.Generator) -> list[list[int]] | None:
        """`--box-size normal`: a normal cell of the same tile, drawn afresh each epoch, for each
        abnormal box to grow to (`cell_crops`); None where the tile lists no normal cell."""
        normal = tile["normal_boxes"]
        if not normal:
            return None
        return [normal[i] for i in rng.integers(0, len(normal), len(tile["boxes"]))]

    def loss(self, model: ACSTrainingModel, batch: CropBatch) -> torch.Tensor:
        return model.loss(batch)

    def sample_images(self, model: ACSTrainingModel, seed: int) -> np.ndarray:
        """One row per sample crop: the crop with its box drawn, then the cell edited into each
        class and pasted back the way `generate` does it (DDIM, CFG 5.0, feathered box; one noise
        per crop, so only the class differs along a row)."""
        crops = self._sample_crops
        classes = len(ABNORMAL_CLASSES)
        batch = CropBatch(
            images=np.repeat(np.stack([c.image for c in crops]), classes, axis=0),
            boxes=np.repeat(np.array([c.box for c in crops]), classes, axis=0),
            labels=[label for _ in crops for label in ABNORMAL_CLASSES],
        )
        seeds = [seed + i for i, _ in enumerate(crops) for _ in ABNORMAL_CLASSES]
        edited = model.edit(batch, seeds, DDIMScheduler.from_config(model.noise_scheduler.config), steps=self.sample_steps)
        rows = []
        for i, crop in enumerate(crops):
            row = [_outlined(crop.image, crop.box)]
            for edit in edited[i * classes : (i + 1) * classes]:
                pasted = crop.image.copy()
                paste_back(pasted, edit, (0, 0), crop.box, SynthesisSettings.feather)
                row.append(pasted)
            rows.extend(row)
        return np.stack(rows)

    @cached_property
    def _sample_crops(self) -> list[CellCrop]:
        """The first crops of the data, in index order: the same ones in every grid of a run."""
        crops = (c for tile in read_tiles(self.entries) for c in cell_crops(tile["image"], tile["boxes"], tile["labels"]))
        return list(itertools.islice(crops, self.sample_count))

    def save(self, model: ACSTrainingModel, out_url: str) -> str:
        """`<out>/acs_unet/`: the base model's own UNet weights plus the trained parameters in float32.

        Frozen weights are taken from the base model again, not from the training copy (bf16 on
        GPU), so everything that did not train is bit-identical to SD1.5.
        """
        acs = acs_unet_from_base(load_sd_components(self.model_dir, self.preset).unet)
        _, unexpected = acs.load_state_dict(trained_state(model.unet), strict=False)
        if unexpected:
            raise RuntimeError(f"trained parameters the ACS does not have: {unexpected[:3]}")
        url = storage.join(out_url, ACS_DIR)
        with tempfile.TemporaryDirectory() as local:
            acs.save_pretrained(local, safe_serialization=True)
            # config.json last: loaders look for it first, so a half-uploaded folder is not taken for a model.
            for path in sorted(Path(local).iterdir(), key=lambda p: p.name == "config.json"):
                storage.put_bytes(storage.join(url, path.name), path.read_bytes())
        return url


def _where(entry: dict[str, Any]) -> str:
    return f"sample {entry['key']} of {entry['source']}" if entry["key"] is not None else entry["source"]


def _outlined(image: np.ndarray, box: tuple[int, int, int, int], width: int = 2) -> np.ndarray:
    """A copy of `image` with the box drawn in green: where the edit goes."""
    out = image.copy()
    x0, y0, x1, y1 = box
    green = np.array([0, 200, 0], np.uint8)
    out[y0 : y0 + width, x0:x1] = out[max(y1 - width, y0) : y1, x0:x1] = green
    out[y0:y1, x0 : x0 + width] = out[y0:y1, max(x1 - width, x0) : x1] = green
    return out
