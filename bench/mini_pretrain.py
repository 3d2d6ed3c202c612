"""Base pretraining of the miniature: the stand-in for SD1.5's own training, on the base domain.

The only step of the miniature the paper does not have, so it lives here in the study and never
in `generate`'s path. A VAE learns to reconstruct base-domain tiles (many stain styles); then a
text-to-image UNet learns those tiles' latents conditioned on their caption (the style's name),
with the caption dropped 10% of the time so the empty prompt exists for classifier-free guidance.
The text encoder is the preset's seeded CLIP tower, first taught to tell the miniature's words
apart (`train_text_encoder`): a random tower gives every caption nearly the same embedding, so
nothing downstream could be conditioned on it. It is then frozen, as CLIP is in SD1.5. The result
is a diffusers SD folder (vae/ unet/ text_encoder/ tokenizer/ scheduler/) that `--model-dir` reads.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image

from cytosynth.synth.abnormal import CELL_PROMPT
from cytosynth.synth.models import _seeded, build_text_encoder, offline_tokenizer
from cytosynth.synth.normal import NORMAL_PROMPT
from cytosynth.synth.phantom_classes import CELL_CLASSES, STYLES
from cytosynth.synth.presets import get_preset
from cytosynth.synth.sampling import decode_latents, encode_images, encode_text
from cytosynth.synth.ldm_training import diffusion_loss, noise_scheduler, pixels

CAPTION_DROPOUT = 0.1


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then a cosine decay to zero (short runs need both)."""
    w = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / w if i < w else 0.5 * (1 + np.cos(np.pi * (i - w) / max(1, steps - w))))


def concept_captions() -> list[tuple[str, int]]:
    """(caption, concept) pairs: every prompt the miniature's jobs use, and each bare word, by what it names."""
    concepts = [[""], [NORMAL_PROMPT]]
    concepts += [[style.caption, name] for name, style in STYLES.items()]
    concepts += [[CELL_PROMPT.format(cls=c), c] for c in CELL_CLASSES]
    return [(caption, i) for i, captions in enumerate(concepts) for caption in captions]


def text_similarity(tokenizer, text_encoder, captions: list[str]) -> float:
    """The highest cosine similarity between the pooled embeddings of two different captions."""
    with torch.no_grad():
        _, pooled = encode_text(tokenizer, text_encoder, captions)
    pooled = torch.nn.functional.normalize(pooled, dim=1)
    cos = pooled @ pooled.T
    return float(cos[~torch.eye(len(captions), dtype=torch.bool)].max())


def train_text_encoder(preset: str, steps: int, seed: int, log):
    """The CLIP stand-in: the seeded tower trained until each concept's captions have their own
    direction, pooled (GLIGEN's phrase input) and averaged over tokens (what cross-attention reads).

    The loss is a cosine softmax over the concepts (temperature 0.1), so the directions must part,
    not just the logits. Measured on the preset's random tower: the four class phrases' pooled
    embeddings have cosine similarity up to 0.94, the style captions up to 0.98; a base UNet trained
    1,000 steps on them drew the same tile for every style (bench/RESULTS.md, the second run).
    """
    p = get_preset(preset)
    with _seeded(seed):
        text_encoder = build_text_encoder(p)
    tokenizer = offline_tokenizer(p.tokenizer_max_length)
    pairs = concept_captions()
    tokens = tokenizer([c for c, _ in pairs], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    target = torch.tensor([i for _, i in pairs])
    width = text_encoder.config.hidden_size
    heads = torch.nn.Parameter(torch.randn(2, int(target.max()) + 1, width, generator=torch.Generator().manual_seed(seed)))
    opt = torch.optim.AdamW([*text_encoder.parameters(), heads], lr=1e-3, weight_decay=0.0)
    before = text_similarity(tokenizer, text_encoder, CELL_CLASSES)
    for step in range(steps):
        out = text_encoder(tokens)
        loss = 0.0
        for head, features in zip(heads, (out.pooler_output, out.last_hidden_state.mean(dim=1))):
            cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head, dim=1).T
            loss = loss + torch.nn.functional.cross_entropy(cos / 0.1, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    text_encoder.eval().requires_grad_(False)
    after = text_similarity(tokenizer, text_encoder, CELL_CLASSES)
    log(f"text encoder: {steps} steps, loss {loss.item():.4f}; class phrases' max cosine {before:.3f} -> {after:.3f}")
    return text_encoder, tokenizer, {"text_steps": steps, "class_phrase_max_cosine": [round(before, 3), round(after, 3)],
                                     "style_caption_max_cosine": round(text_similarity(
                                         tokenizer, text_encoder, [s.caption for s in STYLES.values()]), 3)}


def load_pngs(folder: str) -> np.ndarray:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])


def load_folder(folder: str) -> tuple[np.ndarray, list[str]]:
    """A base-domain folder: its tiles and their captions (captions.json, in file order)."""
    with open(os.path.join(folder, "captions.json")) as fh:
        return load_pngs(folder), json.load(fh)


def train_vae(tiles: np.ndarray, target: np.ndarray, preset: str, steps: int, batch: int, crop: int, seed: int,
              log) -> AutoencoderKL:
    """L1 reconstruction + a small KL on random crops (the VAE is convolutional: crops teach it all).

    Half of every batch comes from `target` (target-style tiles): drawn in proportion (64 of 448
    tiles) the VAE turned both of the target's stains, pink and blue-green, into one grey-violet,
    and the shipped classifier named the class of 44% of reconstructed real cells; half and half,
    48% (bench/RESULTS.md, "Fourth full run").
    """
    with _seeded(seed):
        vae = AutoencoderKL(**get_preset(preset).vae)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    base, tiles = len(tiles), np.concatenate([tiles, target])  # target tiles are indices base..
    size = tiles.shape[1]
    start = time.time()
    for step in range(steps):
        idx = np.concatenate([rng.integers(0, base, batch - batch // 2), rng.integers(base, len(tiles), batch // 2)])
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
def set_latent_scale(vae: AutoencoderKL, tiles: np.ndarray, batch: int = 16) -> dict:
    """Set the VAE's `scaling_factor` to 1 / the std of its latents on `tiles`, as LDM chose SD's.

    SD1.5's 0.18215 is that number for SD1.5's autoencoder (latent std about 5.5); a VAE trained
    here has latents of std about 1, so the preset's 0.18215 left the diffusion models latents of
    std 0.215: a signal-to-noise ratio 1/20 of the schedule's at every timestep (bench/RESULTS.md,
    the third run). Every job reads the factor from vae/config.json.
    """
    mean, std = encode_all(vae, tiles, batch)
    latent_std = float((mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))).std())
    before = vae.config.scaling_factor
    vae.register_to_config(scaling_factor=round(1.0 / latent_std, 5))
    return {"latent_std": round(latent_std, 4), "scaling_factor": [before, vae.config.scaling_factor]}


@torch.no_grad()
def encode_all(vae: AutoencoderKL, tiles: np.ndarray, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every tile's latent (sampled afresh at each training step)."""
    means, stds = [], []
    for i in range(0, len(tiles), batch):
        dist = vae.encode(pixels(torch.from_numpy(tiles[i : i + batch]), torch.float32)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(vae: AutoencoderKL, text_encoder, tokenizer, tiles: np.ndarray, captions: list[str], preset: str,
               steps: int, batch: int, seed: int, log) -> UNet2DConditionModel:
    """Text-to-image LDM training, caption = style, caption dropout for CFG."""
    p = get_preset(preset)
    with _seeded(seed):
        unet = UNet2DConditionModel(**p.unet)
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
    return unet.eval().requires_grad_(False)


def reconstruction_check(vae: AutoencoderKL, folder: str) -> dict:
    """How the VAE reconstructs the tiles in `folder` (the paper's Fig. 3 check): PSNR, and the
    pink (eosinophilic) pixels' red-minus-blue, drawn and reconstructed (is their hue kept?)."""
    tiles = load_pngs(folder)
    with torch.no_grad():
        rec = np.concatenate([decode_latents(vae, encode_images(vae, tiles[i : i + 8])) for i in range(0, len(tiles), 8)])
    drawn, rec = tiles.astype(np.float64), rec.astype(np.float64)
    mse = float(((rec - drawn) ** 2).mean())
    pink = drawn[..., 0] - drawn[..., 2] > 15
    return {"psnr_db": round(float(10 * np.log10(255.0**2 / mse)), 2),
            "pink_red_minus_blue": [round(float((x[pink][:, 0] - x[pink][:, 2]).mean()), 1) for x in (drawn, rec)]}


def pretrain_base(data: str, vae_extra: str, check: str, out: str, preset: str, text_steps: int, vae_steps: int,
                  vae_crop: int, unet_steps: int, unet_batch: int, seed: int, log) -> dict:
    """Train and save the base model (a diffusers SD folder) into `out`; returns what was done.

    The VAE also sees the tiles of `vae_extra` (target-style NILM tiles, half of each batch): the
    paper relies on SD1.5's autoencoder reconstructing Pap images faithfully (its Fig. 3) and trains
    none, so the stand-in has seen them too. The UNet sees the base domain alone. `check` (held-out target tiles)
    measures the reconstruction (`reconstruction_check`).
    """
    # The VAE's posterior draws and the UNet's noise and timesteps come from torch's global RNG,
    # which torch seeds afresh in every process: unseeded, no two runs pretrained the same base
    # (bench/RESULTS.md, "Why Table I moved between runs").
    torch.manual_seed(seed)
    tiles, captions = load_folder(data)
    t0 = time.time()
    text_encoder, tokenizer, text_record = train_text_encoder(preset, text_steps, seed, log)
    vae = train_vae(tiles, load_pngs(vae_extra), preset, vae_steps, batch=8, crop=vae_crop, seed=seed, log=log)
    scale = set_latent_scale(vae, tiles)
    log(f"vae latent std {scale['latent_std']}: scaling_factor {scale['scaling_factor'][0]} -> {scale['scaling_factor'][1]}")
    reconstruction = reconstruction_check(vae, check)
    log(f"vae on the held-out target tiles: {reconstruction}")
    t1 = time.time()
    unet = train_unet(vae, text_encoder, tokenizer, tiles, captions, preset, unet_steps, batch=unet_batch, seed=seed,
                      log=log)
    t2 = time.time()
    vae.save_pretrained(os.path.join(out, "vae"))
    unet.save_pretrained(os.path.join(out, "unet"))
    text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    DDIMScheduler(**get_preset(preset).scheduler).save_pretrained(os.path.join(out, "scheduler"))
    return {"tiles": len(tiles), "styles": sorted(set(captions)), **text_record, "vae_steps": vae_steps,
            "vae_crop": vae_crop, "vae_batch": 8, "vae_extra_tiles": len(load_pngs(vae_extra)),
            "vae_latent_scale": scale, "vae_on_target": reconstruction, "unet_steps": unet_steps, "unet_batch": unet_batch,
            "vae_seconds": round(t1 - t0), "unet_seconds": round(t2 - t1)}
