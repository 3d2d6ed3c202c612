"""finetune-normal: train the Normal Image Generator's LoRA (paper Sec. III-A and IV-A) on the harness.

SD1.5 with a rank-8 LoRA on the UNet's cross-attention (attn2) q, k, v and out projections; the
base UNet, the VAE and the text encoder stay frozen. Every step encodes a batch of normal tiles
to latents, noises them at random timesteps and regresses the noise (the LDM loss), conditioned
on the fixed prompt "A normal cervical cytopathological image". The paper: 1,000 tiles of
1024x1024, Adam, lr 1e-4, batch 1, 5k iterations.

Data is a folder of tiles, WebDataset shards, or either on `s3://`, streamed tile by tile (never
copied whole to local disk). The output is `pytorch_lora_weights.safetensors` in diffusers
format: `StableDiffusionPipeline.load_lora_weights` and `cytosynth generate --lora` read it: the
last step's LoRA, or with `selection` (--select-by fid) the best-scoring one (training.model_selection).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler

from cytosynth import storage
from cytosynth.synth import InvalidInputError, tile_seed
from cytosynth.synth.models import LORA_FILE, SD_COMPONENTS, add_normal_lora, save_normal_lora
from cytosynth.synth.normal import NORMAL_PROMPT, NormalTileGenerator
from cytosynth.synth.sampling import encode_text
from cytosynth.synth.ldm_training import (
    PosteriorCache,
    SDComponents,
    diffusion_loss,
    freeze_all_but,
    load_sd_components,
    noise_scheduler,
)

from .model_selection import FidSelection, record_score

TILES_CHECKED_UP_FRONT = 4  # the rest are checked as they stream in (a real set is thousands)
SELECTION_SEED = 0  # the tiles scored for --select-by: the same seeds at every step, so scores compare
SAMPLING_BATCH = 4  # tiles per sampler call: bounds memory at 1024x1024 whatever the count


class NormalLoraModel(torch.nn.Module):
    """SD1.5 components with the LoRA added to the UNet: what finetune-normal trains. The tiles'
    posteriors are kept between steps (`PosteriorCache`: not a buffer, so never in a checkpoint)."""

    def __init__(self, sd: SDComponents, rank: int, prompt: str) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = sd.unet, sd.vae, sd.text_encoder
        self.tokenizer, self.scheduler_config, self.prompt = sd.tokenizer, sd.scheduler_config, prompt
        self.noise_scheduler = noise_scheduler(sd.scheduler_config)
        self.posteriors = PosteriorCache()
        add_normal_lora(self.unet, rank)
        self._prompt_embeddings: torch.Tensor | None = None

    def prompt_embeddings(self) -> torch.Tensor:
        """(1, 77, D) CLIP embeddings of the prompt; the encoder is frozen, so computed once."""
        if self._prompt_embeddings is None:
            self._prompt_embeddings, _ = encode_text(self.tokenizer, self.text_encoder, [self.prompt])
        return self._prompt_embeddings


@dataclass(frozen=True)
class NormalLoraTask:
    """The harness task (training.loop) of `cytosynth finetune-normal`."""

    data: str
    model_dir: str | None = None  # a diffusers SD1.5 folder or URL; None: the preset's random weights
    preset: str = "tiny"
    tile_size: int = 1024
    rank: int = 8
    prompt: str = NORMAL_PROMPT
    sample_count: int = 4
    sample_steps: int = 25
    selection: FidSelection | None = None  # keep the best step by FID instead of the last
    name: str = "finetune-normal"
    trains_in_bf16: ClassVar[bool] = True

    def record(self) -> dict[str, Any]:
        unrecorded = ("name", "sample_count", "sample_steps", "selection")
        settings = {k: v for k, v in asdict(self).items() if k not in unrecorded}
        return settings if self.selection is None else {**settings, **self.selection.record()}

    def validate(self) -> None:
        if self.tile_size < 64 or self.tile_size % 64:
            raise InvalidInputError(f"--tile-size must be a multiple of 64, got {self.tile_size}")
        if self.rank < 1:
            raise InvalidInputError(f"--rank must be at least 1, got {self.rank}")
        if self.model_dir is not None:
            for part in SD_COMPONENTS:
                if not storage.exists(storage.join(self.model_dir, part)):
                    raise InvalidInputError(f"model {self.model_dir}: missing the {part}/ folder of a diffusers SD1.5 model")
        sources = storage.list_image_set(self.data)
        for where, tile in itertools.islice(_tiles_in_order(sources), TILES_CHECKED_UP_FRONT):
            self.check_tile(where, tile)
        if self.selection is not None:
            self.selection.validate()

    def check_tile(self, where: str, tile: np.ndarray) -> None:
        if tile.shape[:2] != (self.tile_size, self.tile_size):
            raise InvalidInputError(
                f"tile {where} is {tile.shape[1]}x{tile.shape[0]}, expected {self.tile_size}x{self.tile_size} (--tile-size)"
            )

    def build(self, device: torch.device) -> tuple[NormalLoraModel, list[torch.nn.Parameter]]:
        model = NormalLoraModel(load_sd_components(self.model_dir, self.preset), self.rank, self.prompt).to(device)
        return model, freeze_all_but(model, lambda name: ".lora_" in name)

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches of this worker's tiles, endlessly."""
        tiles = _worker_tiles(storage.list_image_set(self.data), rank, world_size, seed, self.data)
        while True:
            batch = []
            for where, tile in itertools.islice(tiles, batch_size):
                self.check_tile(where, tile)
                batch.append(tile)
            yield np.stack(batch)

    def loss(self, model: NormalLoraModel, batch: np.ndarray) -> torch.Tensor:
        latents = model.posteriors.sample_latents(model.vae, batch)
        context = model.prompt_embeddings().expand(len(latents), -1, -1)
        return diffusion_loss(model.unet, model.noise_scheduler, latents, context)

    def sample_images(self, model: NormalLoraModel, seed: int) -> np.ndarray:
        return self.draw_tiles(model, seed, self.sample_count, batch=self.sample_count)

    def draw_tiles(self, model: NormalLoraModel, seed: int, count: int, batch: int = SAMPLING_BATCH) -> np.ndarray:
        """Tiles from the current LoRA, the way `generate` draws them (DDIM, CFG 5.0), `batch` per call."""
        generator = NormalTileGenerator(
            model.unet, model.vae, model.text_encoder, model.tokenizer,
            DDIMScheduler.from_config(model.scheduler_config), self.tile_size, self.sample_steps, prompt=self.prompt,
        )
        seeds = [tile_seed(seed, i) for i in range(count)]
        return np.concatenate([generator(seeds[i : i + batch]) for i in range(0, count, batch)])

    def select(self, model: NormalLoraModel, out_url: str, step: int, final: bool) -> dict[str, Any] | None:
        """Model selection (training.loop): FID of `selection.count` tiles against the held-out set."""
        if self.selection is None:
            return None
        tiles = self.draw_tiles(model, SELECTION_SEED, self.selection.count)
        score = self.selection.scorer(model.unet.device).fid(tiles)
        return record_score(out_url, step, final, score, LORA_FILE)

    def save(self, model: NormalLoraModel, out_url: str) -> str:
        with tempfile.TemporaryDirectory() as local:
            path = save_normal_lora(model.unet, local)
            url = storage.join(out_url, LORA_FILE)
            storage.put_bytes(url, path.read_bytes())
        return url


def _tiles_in_order(sources: storage.ImageSet) -> Iterator[tuple[str, np.ndarray]]:
    """(where, tile) for every tile of a set (or of a part of it), in order."""
    if sources.from_shards:
        for sample in storage.read_samples(list(sources.shards)):
            yield f"{sample['key']} of {sources.shards[0].rsplit('/', 1)[0]}", sample["image"]
    else:
        for url in sources.files:
            yield url, storage.read_image(url)


def _worker_tiles(found: storage.ImageSet, rank: int, world_size: int, seed: int, data: str) -> Iterator[tuple[str, np.ndarray]]:
    """This worker's share of the tiles, epoch after epoch, each epoch in a fresh order.

    Images are dealt round-robin; shards go whole where they divide evenly and the remainder is
    read by every worker keeping every world_size-th tile (storage.split_shards), so each tile
    is seen once per epoch.
    """
    for epoch in itertools.count():
        sources = found.shards or found.files
        order = np.random.default_rng([seed, epoch]).permutation(len(sources))
        shuffled = tuple(sources[i] for i in order)
        if found.from_shards:
            whole, shared = storage.split_shards(shuffled, rank, world_size)
            mine = itertools.chain(
                _tiles_in_order(storage.ImageSet(found.url, shards=tuple(whole))),
                (t for i, t in enumerate(_tiles_in_order(storage.ImageSet(found.url, shards=tuple(shared))))
                 if i % world_size == rank),
            )
        else:
            mine = _tiles_in_order(storage.ImageSet(found.url, files=shuffled[rank::world_size]))
        empty = True
        for item in mine:
            empty = False
            yield item
        if empty:
            raise InvalidInputError(f"{data} holds too few tiles for {world_size} workers")
