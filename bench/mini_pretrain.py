"""Base pretraining of the miniature: the stand-in for SD1.5's own training, on the base domain.

The only step of the miniature the paper does not have, so it lives here in the study and never
in `generate`'s path. A VAE learns to reconstruct base-domain tiles (many stain styles); then a
text-to-image UNet learns those tiles' latents conditioned on their caption (the style's name),
with the caption dropped 10% of the time so the empty prompt exists for classifier-free guidance.
The text encoder is the preset's seeded random CLIP tower, frozen: distinct captions still get
distinct embeddings, which is all conditioning needs. The result is a diffusers SD folder
(vae/ unet/ text_encoder/ tokenizer/ scheduler/) that `--model-dir` reads.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image

from cytosynth.synth.models import _seeded, build_text_encoder, offline_tokenizer
from cytosynth.synth.presets import get_preset
from cytosynth.synth.sampling import encode_text
from cytosynth.synth.ldm_training import diffusion_loss, noise_scheduler, pixels

CAPTION_DROPOUT = 0.1


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then a cosine decay to zero (short runs need both)."""
    w = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / w if i < w else 0.5 * (1 + np.cos(np.pi * (i - w) / max(1, steps - w))))


def load_folder(folder: str) -> tuple[np.ndarray, list[str]]:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    tiles = np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])
    with open(os.path.join(folder, "captions.json")) as fh:
        return tiles, json.load(fh)


def train_vae(tiles: np.ndarray, preset: str, steps: int, batch: int, crop: int, seed: int, log) -> AutoencoderKL:
    """L1 reconstruction + a small KL on random crops (the VAE is convolutional: crops teach it all)."""
    with _seeded(seed):
        vae = AutoencoderKL(**get_preset(preset).vae)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    size = tiles.shape[1]
    start = time.time()
    for step in range(steps):
        idx = rng.integers(0, len(tiles), batch)
        ys, xs = rng.integers(0, size - crop + 1, (2, batch))
        batch_px = np.stack([tiles[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs)])
        x = pixels(torch.from_numpy(batch_px), torch.float32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} l1+kl {loss.item():.4f} ({time.time() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, tiles: np.ndarray, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every tile's latent (sampled afresh at each training step)."""
    means, stds = [], []
    for i in range(0, len(tiles), batch):
        dist = vae.encode(pixels(torch.from_numpy(tiles[i : i + batch]), torch.float32)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(vae: AutoencoderKL, tiles: np.ndarray, captions: list[str], preset: str, steps: int, batch: int,
               seed: int, log):
    """Text-to-image LDM training, caption = style, caption dropout for CFG."""
    p = get_preset(preset)
    with _seeded(seed):
        text_encoder = build_text_encoder(p).eval().requires_grad_(False)
        unet = UNet2DConditionModel(**p.unet)
    tokenizer = offline_tokenizer(p.tokenizer_max_length)
    styles = sorted(set(captions))
    with torch.no_grad():
        table, _ = encode_text(tokenizer, text_encoder, styles + [""])
    caption_ids = torch.tensor([styles.index(c) for c in captions])
    mean, std = encode_all(vae, tiles)
    scale = vae.config.scaling_factor
    ddpm = noise_scheduler(DDIMScheduler(**p.scheduler).config)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(tiles), (batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        ids = caption_ids[idx].clone()
        ids[torch.rand(batch, generator=gen) < CAPTION_DROPOUT] = len(styles)  # the empty prompt
        loss = diffusion_loss(unet, ddpm, latents, table[ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return unet.eval().requires_grad_(False), text_encoder, tokenizer


def pretrain_base(data: str, out: str, preset: str, vae_steps: int, vae_crop: int, unet_steps: int, unet_batch: int,
                  seed: int, log) -> dict:
    """Train and save the base model (a diffusers SD folder) into `out`; returns what was done."""
    tiles, captions = load_folder(data)
    t0 = time.time()
    vae = train_vae(tiles, preset, vae_steps, batch=8, crop=vae_crop, seed=seed, log=log)
    t1 = time.time()
    unet, text_encoder, tokenizer = train_unet(vae, tiles, captions, preset, unet_steps, batch=unet_batch, seed=seed,
                                               log=log)
    t2 = time.time()
    vae.save_pretrained(os.path.join(out, "vae"))
    unet.save_pretrained(os.path.join(out, "unet"))
    text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    DDIMScheduler(**get_preset(preset).scheduler).save_pretrained(os.path.join(out, "scheduler"))
    return {"tiles": len(tiles), "styles": sorted(set(captions)), "vae_steps": vae_steps, "vae_crop": vae_crop,
            "vae_batch": 8, "unet_steps": unet_steps, "unet_batch": unet_batch,
            "vae_seconds": round(t1 - t0), "unet_seconds": round(t2 - t1)}
