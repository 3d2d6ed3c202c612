"""Small diffusion building blocks shared by both stages: prompts, noise, the DDIM+CFG loop, VAE I/O."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_text(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP token embeddings (B, 77, D) and pooled phrase embeddings (B, D) of `prompts`."""
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    out = text_encoder(tokens.input_ids.to(text_encoder.device))
    return out.last_hidden_state, out.pooler_output


def seeded_noise(
    seeds: Sequence[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so an item's noise never depends on its batch."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def ddim_cfg_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; `denoise(x2, t)` sees [uncond; cond] halves.

    Stage 1 starts from pure `noise`; stage 2 starts from its `clean` latent z0 noised to the
    first timestep by the forward process (the paper's Section III-C). Latents, the guidance
    combination and the DDIM step stay in fp32 whatever dtype `denoise` runs in: bf16 latents
    carry 2.4x the RMS error of fp32 ones. The scheduler is copied so concurrent callers never
    share its timestep state.
    """
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device=noise.device)
    noise = noise.float()
    if clean is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(clean.float(), noise, scheduler.timesteps[:1])
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_uncond, eps_cond = denoise(x, t).float().chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> scaled latents (B, 4, H/8, W/8); the posterior mean, so no noise."""
    x = torch.from_numpy(images).to(device=vae.device, dtype=vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1.0
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (any float dtype) -> uint8 (B, H, W, 3) images."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
