"""Stage 1, Global Image Generation: the Normal Image Generator (SD1.5 + LoRA, merged)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .sampling import ddim_cfg_sample, decode_latents, encode_text, seeded_noise

NORMAL_PROMPT = "A normal cervical cytopathological image"


class NormalTileGenerator:
    """Generates tiles full of NILM cells, a batch per call, each tile from its own seed."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        tile_size: int = 1024,
        steps: int = 25,
        guidance: float = 5.0,
        prompt: str = NORMAL_PROMPT,
    ) -> None:
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.tile_size, self.steps, self.guidance = tile_size, steps, guidance
        # The prompt is fixed, so its embeddings are computed once: [uncond; cond].
        embeddings, _ = encode_text(tokenizer, text_encoder, ["", prompt])
        self.uncond, self.cond = embeddings.to(unet.dtype).chunk(2)

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int]) -> np.ndarray:
        """uint8 tiles (B, tile_size, tile_size, 3), tile b drawn from `seeds[b]` alone."""
        batch = len(seeds)
        side = self.tile_size // 8
        noise = seeded_noise(seeds, (self.unet.config.in_channels, side, side), self.unet.device)
        context = torch.cat([self.uncond.expand(batch, -1, -1), self.cond.expand(batch, -1, -1)])

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=context).sample

        latents = ddim_cfg_sample(denoise, self.scheduler, noise, self.steps, self.guidance)
        return decode_latents(self.vae, latents)
