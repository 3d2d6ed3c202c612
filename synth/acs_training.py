"""Training the Abnormal Cell Synthesizer (the paper's Sections III-C and IV-A).

The ACS starts from the SD1.5 UNet (`models.acs_unet_from_base`): base weights copied, the 5
extra input channels (mask, masked latent) zero, GLIGEN gated self-attention layers and the
box + phrase projection added with their gates closed, so at step 0 it is SD1.5 exactly.

What learns, as in the paper and in GLIGEN's own inpainting training (which the paper follows):

- the gated self-attention layers (`*.fuser.*`, gates alpha included): "trainable gated
  self-attention layers ahead of the cross-attention layers in every transformer block";
- the box + phrase MLP (`position_net.*`): c = MLP([f_text, f_box]);
- the input convolution's weight (`conv_in.weight`): its new channels start at zero and are the
  only way the UNet sees the mask and the background it must keep (GLIGEN trains the first
  conv's weight in inpainting mode).

Everything else stays frozen: ResNet blocks, self- and cross-attention (the paper guides the class
"through the frozen cross-attention layers"), the VAE and the text encoder. The loss is the LDM
objective (`synth.ldm_training.diffusion_loss`) on the 9-channel input [z_t, z0 * mask, mask],
counted inside the box only: the box is all the UNet must paint and all that is pasted back.
Outside it the noise is a linear function of z_t and the given z0; counted over the whole crop,
that copy (most of a crop's area) took the few trainable parameters, and the trained ACS drew
the cell worse than the untrained one (bench/RESULTS.md, "Fourth full run").

Classifier-free guidance is trained, as GLIGEN trains it: each crop independently has its prompt
replaced by the empty prompt (`PROMPT_DROPOUT`) and its grounding token hidden (GLIGEN masks = 0,
`GROUNDING_DROPOUT`), so the UNet learns the unconditional estimate that sampling's first CFG
half asks for (`abnormal.edit_cells`). The paper does not state its rates; these are GLIGEN's.
The prompt rate is high because the frozen cross-attention reads the class word poorly: dropping
the prompt half the time makes the trainable grounding path carry the class, which is the signal
CFG 5.0 then amplifies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention import GatedSelfAttentionDense

from .abnormal import ClassEmbeddings, edit_cells, grounding_inputs, inpainting_condition
from .cell_crops import CropBatch
from .cfg_dropout import GROUNDING_DROPOUT, PROMPT_DROPOUT
from .classes import ABNORMAL_CLASSES
from .models import acs_unet_from_base
from .ldm_training import PosteriorCache, diffusion_loss, freeze_all_but

ACS_TRAINABLE = re.compile(r"\.fuser\.|^position_net\.|^conv_in\.weight$")


GATES = ("alpha_attn", "alpha_dense")


def is_acs_trainable(name: str) -> bool:
    """True for the parameters the paper trains (module docstring); `name` as in `named_parameters`."""
    return ACS_TRAINABLE.search(name) is not None


def hold_gates_as_vectors(unet: UNet2DConditionModel) -> None:
    """Give GLIGEN's 0-dim gate parameters shape (1,) for training: DeepSpeed broadcasts every
    parameter as a byte view, which a 0-dim tensor cannot give. tanh(alpha) broadcasts the same."""
    for module in unet.modules():
        if isinstance(module, GatedSelfAttentionDense):
            for gate in GATES:
                setattr(module, gate, torch.nn.Parameter(getattr(module, gate).detach().reshape(1)))


def trained_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The trainable parameters in float32 on the CPU, shaped as in a diffusers ACS UNet (scalar gates)."""
    return {
        name: p.detach().float().cpu().reshape(()) if name.rsplit(".", 1)[-1] in GATES else p.detach().float().cpu()
        for name, p in unet.named_parameters()
        if p.requires_grad
    }


class ACSTrainingModel(torch.nn.Module):
    """The ACS UNet with what its loss needs: the frozen VAE and the classes' text embeddings.

    Embeddings are computed once with the frozen text encoder, which is then not needed; they are
    buffers, so they follow the module to its device (their dtype depends on DeepSpeed's version,
    so the UNet call casts them: `abnormal.predict_noise`). The crops' posteriors are kept between
    steps (`PosteriorCache`: not a buffer, so never in a checkpoint).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        embeddings: ClassEmbeddings,
        noise_scheduler: DDPMScheduler,
        classes: Sequence[str] = ABNORMAL_CLASSES,
        prompt_dropout: float = PROMPT_DROPOUT,
        grounding_dropout: float = GROUNDING_DROPOUT,
    ) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        self.noise_scheduler = noise_scheduler
        self.classes = tuple(classes)
        self.prompt_dropout, self.grounding_dropout = prompt_dropout, grounding_dropout
        self.posteriors = PosteriorCache()
        self.register_buffer("uncond_embeddings", embeddings.uncond.clone(), persistent=False)
        self.register_buffer("prompt_embeddings", torch.stack([embeddings.prompt[c] for c in classes]), persistent=False)
        self.register_buffer("phrase_embeddings", torch.stack([embeddings.phrase[c] for c in classes]), persistent=False)

    @classmethod
    def from_base(
        cls,
        base_unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        embeddings: ClassEmbeddings,
        noise_scheduler: DDPMScheduler,
        prompt_dropout: float = PROMPT_DROPOUT,
        grounding_dropout: float = GROUNDING_DROPOUT,
    ) -> tuple["ACSTrainingModel", list[torch.nn.Parameter]]:
        """A fresh ACS from an SD1.5 UNet, everything but `is_acs_trainable` frozen; (model, trainable)."""
        unet = acs_unet_from_base(base_unet)
        hold_gates_as_vectors(unet)
        model = cls(
            unet, vae.requires_grad_(False).eval(), embeddings, noise_scheduler,
            prompt_dropout=prompt_dropout, grounding_dropout=grounding_dropout,
        )
        return model, freeze_all_but(model.unet, is_acs_trainable)

    @property
    def embeddings(self) -> ClassEmbeddings:
        return ClassEmbeddings(
            uncond=self.uncond_embeddings,
            prompt=dict(zip(self.classes, self.prompt_embeddings)),
            phrase=dict(zip(self.classes, self.phrase_embeddings)),
        )

    def loss(self, batch: CropBatch) -> torch.Tensor:
        """The LDM loss of a batch of crops: noise z0 of the crop, predict the noise from
        [z_t, z0 * mask, mask], the class prompt and the (box, phrase) grounding token, each
        dropped at its rate; the error counted inside the box only (the module docstring)."""
        dtype = self.unet.dtype
        z0 = self.posteriors.sample_latents(self.vae, batch.images).to(dtype)
        n, embeddings = len(batch.labels), self.embeddings
        keep_prompt = (torch.rand(n) >= self.prompt_dropout).to(z0.device)
        prompts = torch.where(keep_prompt[:, None, None], embeddings.prompts(batch.labels), embeddings.uncond)
        keep_grounding = (torch.rand(n) >= self.grounding_dropout).float()
        phrases = embeddings.phrases(batch.labels).to(dtype)
        grounding = grounding_inputs(batch.boxes, phrases, batch.images.shape[1], keep_grounding)
        condition = inpainting_condition(z0, batch.boxes)
        return diffusion_loss(
            self.unet,
            self.noise_scheduler,
            z0,
            prompts.to(dtype),
            conditioning=condition,
            region=1.0 - condition[:, -1:],  # the mask channel is 0 in the box
            cross_attention_kwargs={"gligen": grounding},
        )

    @torch.no_grad()
    def edit(self, batch: CropBatch, seeds: Sequence[int], scheduler: DDIMScheduler, steps: int = 25, guidance: float = 5.0) -> np.ndarray:
        """What `cytosynth generate` would paint into these crops with the current weights."""
        return edit_cells(
            self.unet, self.vae, scheduler, self.embeddings, batch.images, batch.boxes, batch.labels, seeds, steps, guidance
        )
