"""Stage 2, Local Cell Editing: the Abnormal Cell Synthesizer.

An inpainting UNet (9 input channels) with GLIGEN gated self-attention turns the cell inside a
box of a 256x256 crop into an abnormal cell of a given class (the paper's Section III-C):

- the crop is encoded to a 32x32x4 latent z0; the mask (1 outside the box, 0 inside) is
  downsampled to 32x32 and multiplies z0, giving the background latent;
- every step the UNet sees [z_t, mask, masked z0] and grounding tokens
  MLP([CLIP(phrase <cls>), Fourier(box)]) through its gated self-attention layers;
- the prompt is "A cervical cytopathological image with <cls> cell"; DDIM 25, CFG 5.0.

All cells of a batch of tiles go through the UNet as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .classes import ABNORMAL_CLASSES
from .sampling import ddim_cfg_sample, decode_latents, encode_images, encode_text, seeded_noise

CELL_PROMPT = "A cervical cytopathological image with {cls} cell"
LATENT_SCALE = 8  # the VAE's downsampling factor


def latent_box_mask(boxes: np.ndarray, latent_size: int) -> torch.Tensor:
    """(N, 1, s, s) mask, 0 over every latent cell a box touches, 1 elsewhere (the background)."""
    mask = torch.ones(len(boxes), 1, latent_size, latent_size)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        lx0, ly0 = x0 // LATENT_SCALE, y0 // LATENT_SCALE
        lx1, ly1 = -(-x1 // LATENT_SCALE), -(-y1 // LATENT_SCALE)  # ceil: the mask covers the box
        mask[i, :, ly0:ly1, lx0:lx1] = 0.0
    return mask


class AbnormalCellSynthesizer:
    """Edits the cell in each (crop, box, class) into that abnormal class."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        steps: int = 25,
        guidance: float = 5.0,
        classes: Sequence[str] = ABNORMAL_CLASSES,
    ) -> None:
        if unet.config.in_channels != 9 or getattr(unet, "position_net", None) is None:
            raise ValueError("the Abnormal Cell Synthesizer needs a 9-channel UNet with GLIGEN gated attention")
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.steps, self.guidance = steps, guidance
        # Prompts and phrases come from a closed set of classes: embed them all once.
        prompts = [""] + [CELL_PROMPT.format(cls=c) for c in classes]
        prompt_embeddings, _ = encode_text(tokenizer, text_encoder, prompts)
        _, phrase_embeddings = encode_text(tokenizer, text_encoder, list(classes))
        self.uncond = prompt_embeddings[:1].to(unet.dtype)
        self.prompt = {c: e.to(unet.dtype) for c, e in zip(classes, prompt_embeddings[1:])}
        self.phrase = {c: e.to(unet.dtype) for c, e in zip(classes, phrase_embeddings)}

    @torch.no_grad()
    def __call__(self, crops: np.ndarray, boxes: np.ndarray, labels: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Edited crops (N, S, S, 3) uint8 for crops (N, S, S, 3), boxes (N, 4) in crop pixels."""
        n, size = len(crops), crops.shape[1]
        if n == 0:
            return crops.copy()
        device, dtype = self.unet.device, self.unet.dtype
        latent_size = size // LATENT_SCALE

        z0 = encode_images(self.vae, crops)
        mask = latent_box_mask(np.asarray(boxes), latent_size).to(device=device, dtype=dtype)
        extra = torch.cat([mask, z0 * mask], dim=1).repeat(2, 1, 1, 1)  # same for both CFG halves

        cond = torch.stack([self.prompt[c] for c in labels])
        context = torch.cat([self.uncond.expand(n, -1, -1), cond])
        # GLIGEN grounding: one (box, phrase) token per crop, boxes normalised to [0, 1].
        grounding = {
            "boxes": torch.as_tensor(np.asarray(boxes) / size, device=device, dtype=dtype)[:, None].repeat(2, 1, 1),
            "positive_embeddings": torch.stack([self.phrase[c] for c in labels])[:, None].repeat(2, 1, 1),
            "masks": torch.ones(2 * n, 1, device=device, dtype=dtype),
        }

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = torch.cat([x, extra], dim=1)
            return self.unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": grounding}).sample

        noise = seeded_noise(seeds, tuple(z0.shape[1:]), device, dtype)
        latents = ddim_cfg_sample(denoise, self.scheduler, noise, self.steps, self.guidance)
        return decode_latents(self.vae, latents)
