"""Training pieces shared by the diffusion fine-tuning jobs: plain PyTorch + diffusers, no Ray.

The LDM objective (Rombach et al., the loss both of the paper's generators are trained with):
encode an image to latents z0 with the frozen VAE, draw a timestep t ~ U{0, ..., T-1} and noise
eps ~ N(0, I), form z_t with the DDPM forward process, and regress the UNet's prediction on eps
(or on v, if the scheduler says so) with a mean squared error.

Where the parts come from: the base SD1.5 components (`load_sd_components`), the forward process
(`noise_scheduler`), the latents (`sample_latents`, or `PosteriorCache` where images repeat), the
conditioning (`sampling.encode_text`), and which parameters learn (`freeze_all_but`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import InvalidInputError
from .models import localize, random_bundle, require_path

SD_BASE_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """The parts of Stable Diffusion a fine-tuning job starts from (no LoRA, no ACS UNet)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler_config: dict[str, Any]


def load_sd_components(model_dir: str | None, preset: str = "tiny") -> SDComponents:
    """SD1.5 components from a diffusers folder (path or fsspec URL, safetensors only), or the
    preset's seeded random weights when `model_dir` is None (tests, benchmarks).

    Random weights are `random_bundle(preset, seed=0)`'s, so a LoRA trained on them loads into
    the bundle `cytosynth generate --preset tiny` builds.
    """
    if model_dir is None:
        bundle = random_bundle(preset, seed=0)
        return SDComponents(
            bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.unet, dict(bundle.scheduler.config)
        )
    root = localize(model_dir)
    for name in SD_BASE_COMPONENTS:
        require_path(root / name, f"model {model_dir}: missing the {name}/ folder of a diffusers SD1.5 model")
    try:
        return SDComponents(
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True),
            scheduler_config=dict(DDPMScheduler.load_config(root, subfolder="scheduler")),
        )
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"cannot load the SD1.5 model from {model_dir}: {reason}") from None


def noise_scheduler(config: Mapping[str, Any]) -> DDPMScheduler:
    """The DDPM forward process of a scheduler config (SD1.5: 1000 steps, scaled-linear betas).

    Training adds noise with DDPM; the same betas drive DDIM at sampling time.
    """
    return DDPMScheduler.from_config(dict(config))


def freeze_all_but(module: torch.nn.Module, trainable: Callable[[str], bool]) -> list[torch.nn.Parameter]:
    """Freeze every parameter of `module` whose name `trainable` rejects; return the others, in order."""
    kept = []
    for name, param in module.named_parameters():
        param.requires_grad_(trainable(name))
        if param.requires_grad:
            kept.append(param)
    if not kept:
        raise ValueError("freeze_all_but: no parameter left trainable")
    return kept


def pixels(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0


@torch.no_grad()
def sample_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) on the VAE's device -> scaled latents (B, 4, H/8, W/8).

    A draw from the posterior (not its mean), as SD was trained: a cheap augmentation.
    """
    posterior = vae.encode(pixels(images, vae.dtype)).latent_dist
    return _scaled_draw(vae, posterior.mean, posterior.std)


def _scaled_draw(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One draw from N(mean, std^2) (diffusers' `DiagonalGaussianDistribution.sample`), scaled for the UNet."""
    return (mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)) * vae.config.scaling_factor


# Host memory for each training worker's posteriors (mean and std in the VAE's dtype; float32 on
# SD1.5's VAE: 32 KiB for a 256x256 crop, 512 KiB for a 1024x1024 tile). 2 GiB holds 65,536
# crops, ten times the paper's 6,815, or 4,096 tiles; images past it are encoded every step.
POSTERIOR_CACHE_BYTES = 2 * 2**30


class PosteriorCache:
    """The frozen VAE's posterior (mean, std) of each image it encoded, found again by the image's
    bytes: an image seen before is not encoded again, and its latent is still a fresh draw from the
    posterior, as `sample_latents` gives (the same draw for the same random state). Exact because
    the VAE is frozen and the key is the pixels. Both fine-tuning jobs see each image once an epoch
    (the ACS's crops are centred on their cell), and encoding them was a third of the ACS's
    training step (bench/RESULTS.md, the tenth run). Kept in host memory, up to `max_bytes`;
    images past that are encoded every time."""

    def __init__(self, max_bytes: int = POSTERIOR_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._posteriors: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._posteriors)

    @torch.no_grad()
    def sample_latents(self, vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
        """Host uint8 (B, H, W, 3) -> scaled latents (B, 4, H/8, W/8) on the VAE's device."""
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
        found = {k: self._posteriors[k] for k in keys if k in self._posteriors}
        unseen = {k: i for i, k in enumerate(keys) if k not in found}  # an image twice in a batch: once
        if unseen:
            batch = torch.from_numpy(np.ascontiguousarray(images[list(unseen.values())])).to(vae.device)
            posterior = vae.encode(pixels(batch, vae.dtype)).latent_dist
            for j, k in enumerate(unseen):
                # Copies: on the CPU a view would keep its whole batch's encoder output alive.
                found[k] = (posterior.mean[j].to("cpu", copy=True), posterior.std[j].to("cpu", copy=True))
                size = sum(t.numel() * t.element_size() for t in found[k])
                if self.nbytes + size <= self.max_bytes:
                    self._posteriors[k] = found[k]
                    self.nbytes += size
        mean = torch.stack([found[k][0] for k in keys]).to(vae.device)
        std = torch.stack([found[k][1] for k in keys]).to(vae.device)
        return _scaled_draw(vae, mean, std)


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    conditioning: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    **unet_kwargs: Any,
) -> torch.Tensor:
    """The LDM loss of one batch: MSE between the UNet's prediction and the noise (or v) target.

    `conditioning` is concatenated to the noisy latents on the channel axis (an inpainting
    UNet's mask + masked latents); `region` (N, 1, h, w), 1 where the error counts, limits the
    mean to those latent pixels (None: all); `unet_kwargs` reach the UNet (e.g.
    `cross_attention_kwargs` with GLIGEN's boxes and phrase embeddings).
    """
    # Drawn in logical order: the VAE's CPU convolutions return channels-last latents, and the same
    # seed must give the same noise for the same latents however they are laid out (PosteriorCache).
    noise = torch.randn_like(latents, memory_format=torch.contiguous_format)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_input = noisy if conditioning is None else torch.cat([noisy, conditioning.to(noisy.dtype)], dim=1)
    prediction = unet(model_input, timesteps, encoder_hidden_states=encoder_hidden_states, **unet_kwargs).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    # In float32 even under bf16: the mean of many small squared errors loses precision otherwise.
    if region is None:
        return F.mse_loss(prediction.float(), target.float())
    region = region.float().expand_as(target)
    return ((prediction.float() - target.float()) ** 2 * region).sum() / region.sum().clamp(min=1.0)
