"""Stage 2, Local Cell Editing: the Abnormal Cell Synthesizer.

An inpainting UNet (9 input channels) with GLIGEN gated self-attention turns the cell inside a
box of a 256x256 crop into an abnormal cell of a given class (the paper's Section III-C):

- the crop is encoded to a 32x32x4 latent z0; the mask (1 outside the box, 0 inside) is
  downsampled to 32x32 and multiplies z0, giving the background latent;
- every step the UNet sees [z_t, z0 * mask, mask] (`ACS_INPUT_LAYOUT`: GLIGEN's order and
  polarity) and grounding tokens MLP([CLIP(phrase <cls>), Fourier(box)]) through its gated
  self-attention layers;
- the prompt is "A cervical cytopathological image with <cls> cell"; DDIM 25, CFG 5.0. Sampling
  starts from z0 noised to the first timestep by the forward process (z_T ~ q(z_T | z0)); CFG's
  unconditional half has the empty prompt and no grounding token (GLIGEN masks = 0), the two
  things ACS training drops (`synth.acs_training`), so guidance amplifies the class signal.

All cells of a batch of tiles go through the UNet as one batch (`edit_cells`). The conditioning
helpers (`embed_classes`, `inpainting_condition`, `grounding_inputs`) are what ACS training
(`synth.acs_training`) uses too, so the model learns from exactly what it is later asked with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .classes import ABNORMAL_CLASSES
from .errors import InvalidInputError
from .sampling import ddim_cfg_sample, decode_latents, encode_images, encode_text, seeded_noise

CELL_PROMPT = "A cervical cytopathological image with {cls} cell"
LATENT_SCALE = 8  # the VAE's downsampling factor
# The 9 input channels, written into every ACS UNet's config.json and checked on load: a UNet
# with another layout (diffusers' SD inpainting: [z_t, mask, masked z0], mask 1 = the hole)
# would be fed the wrong channels without a word.
ACS_LAYOUT_KEY = "acs_input_layout"
ACS_INPUT_LAYOUT = "gligen: [z_t, z0*mask, mask], mask 1 = background to keep, 0 = box to edit"


def check_acs_layout(config: Mapping[str, object], where: str) -> None:
    """Refuse an ACS UNet config that is not 9-channel gated or does not declare our layout."""
    if config.get("in_channels") != 9 or config.get("attention_type") != "gated":
        raise InvalidInputError(
            f"{where} is not an Abnormal Cell Synthesizer UNet (needs in_channels=9 and attention_type='gated')"
        )
    if config.get(ACS_LAYOUT_KEY) != ACS_INPUT_LAYOUT:
        raise InvalidInputError(
            f"{where}: the 9-channel UNet does not declare cytosynth's input layout; expected "
            f'"{ACS_LAYOUT_KEY}": "{ACS_INPUT_LAYOUT}" in its config.json (an SD inpainting UNet '
            f"uses [z_t, mask, masked z0] and would be fed the wrong channels)"
        )


def latent_box_mask(boxes: np.ndarray, latent_size: int) -> torch.Tensor:
    """(N, 1, s, s) mask, 0 over every latent cell a box touches, 1 elsewhere (the background)."""
    mask = torch.ones(len(boxes), 1, latent_size, latent_size)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        lx0, ly0 = x0 // LATENT_SCALE, y0 // LATENT_SCALE
        lx1, ly1 = -(-x1 // LATENT_SCALE), -(-y1 // LATENT_SCALE)  # ceil: the mask covers the box
        mask[i, :, ly0:ly1, lx0:lx1] = 0.0
    return mask


@dataclass(frozen=True)
class ClassEmbeddings:
    """CLIP embeddings of the closed set of classes, computed once (the text encoder is frozen)."""

    uncond: torch.Tensor  # (77, D) the empty prompt: CFG's unconditional half
    prompt: dict[str, torch.Tensor]  # class -> (77, D) tokens of CELL_PROMPT
    phrase: dict[str, torch.Tensor]  # class -> (D,) pooled embedding of the phrase "<cls>"

    def prompts(self, labels: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.prompt[c] for c in labels])

    def phrases(self, labels: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.phrase[c] for c in labels])


def embed_classes(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    classes: Sequence[str] = ABNORMAL_CLASSES,
    dtype: torch.dtype | None = None,
) -> ClassEmbeddings:
    prompts = [""] + [CELL_PROMPT.format(cls=c) for c in classes]
    prompt_embeddings, _ = encode_text(tokenizer, text_encoder, prompts)
    _, phrase_embeddings = encode_text(tokenizer, text_encoder, list(classes))
    dtype = dtype or prompt_embeddings.dtype
    return ClassEmbeddings(
        uncond=prompt_embeddings[0].to(dtype),
        prompt={c: e.to(dtype) for c, e in zip(classes, prompt_embeddings[1:])},
        phrase={c: e.to(dtype) for c, e in zip(classes, phrase_embeddings)},
    )


def inpainting_condition(z0: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """(N, 5, s, s) = [z0 * mask, mask], what the UNet sees beside z_t: the background to keep."""
    mask = latent_box_mask(np.asarray(boxes), z0.shape[-1]).to(z0)
    return torch.cat([z0 * mask, mask], dim=1)


def grounding_inputs(
    boxes: np.ndarray, phrases: torch.Tensor, crop_size: int, present: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """GLIGEN's `cross_attention_kwargs["gligen"]`: one (box, phrase) token per crop, box in [0, 1].

    `present` (N,) of 0/1 is GLIGEN's `masks`: 0 hides the token (CFG's unconditional half,
    grounding dropout in training); all 1 by default.
    """
    normalised = torch.as_tensor(np.asarray(boxes) / crop_size, device=phrases.device, dtype=phrases.dtype)
    if present is None:
        present = torch.ones(len(phrases))
    return {
        "boxes": normalised[:, None],
        "positive_embeddings": phrases[:, None],
        "masks": present.to(device=phrases.device, dtype=phrases.dtype)[:, None],
    }


def predict_noise(
    unet: UNet2DConditionModel,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    condition: torch.Tensor,
    context: torch.Tensor,
    grounding: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The ACS UNet's noise estimate for z_t: 9-channel input [z_t, z0 * mask, mask], prompt, grounding.

    Inputs are cast to the UNet's dtype here, so callers may hold them in fp32 (the sampler) or
    as buffers of any dtype (DeepSpeed's bf16 casts parameters only, since 0.19.2).
    """
    dtype = unet.dtype
    x = torch.cat([noisy_latents, condition], dim=1).to(dtype)
    grounding = {name: value.to(dtype) for name, value in grounding.items()}
    return unet(x, timesteps, encoder_hidden_states=context.to(dtype), cross_attention_kwargs={"gligen": grounding}).sample


@torch.no_grad()
def edit_cells(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: DDIMScheduler,
    embeddings: ClassEmbeddings,
    crops: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 5.0,
) -> np.ndarray:
    """Edited crops (N, S, S, 3) uint8 for crops (N, S, S, 3), boxes (N, 4) in crop pixels."""
    n, size = len(crops), crops.shape[1]
    if n == 0:
        return crops.copy()

    z0 = encode_images(vae, crops).float()
    # Both CFG halves keep the same background; the unconditional half has neither the prompt
    # nor the grounding token (masks = 0), as ACS training drops them.
    condition = inpainting_condition(z0, boxes).repeat(2, 1, 1, 1)
    phrases = embeddings.phrases(labels).repeat(2, 1)
    present = torch.cat([torch.zeros(n), torch.ones(n)])
    grounding = grounding_inputs(np.concatenate([boxes, boxes]), phrases, size, present)
    context = torch.cat([embeddings.uncond.expand(n, -1, -1), embeddings.prompts(labels)])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return predict_noise(unet, x, t, condition, context, grounding)

    noise = seeded_noise(seeds, tuple(z0.shape[1:]), unet.device)
    latents = ddim_cfg_sample(denoise, scheduler, noise, steps, guidance, clean=z0)
    return decode_latents(vae, latents)


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
        check_acs_layout(unet.config, "the Abnormal Cell Synthesizer's UNet")
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.steps, self.guidance = steps, guidance
        self.embeddings = embed_classes(tokenizer, text_encoder, classes, dtype=unet.dtype)

    def __call__(self, crops: np.ndarray, boxes: np.ndarray, labels: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Edited crops (N, S, S, 3) uint8 for crops (N, S, S, 3), boxes (N, 4) in crop pixels."""
        return edit_cells(
            self.unet, self.vae, self.scheduler, self.embeddings, crops, boxes, labels, seeds, self.steps, self.guidance
        )
