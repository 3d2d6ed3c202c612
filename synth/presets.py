"""Model architectures as data: the `tiny`, `mini` and `sd15` presets.

A preset names the configuration of every component; weights come either from a model bundle
on disk (`sd15` with `--model-dir`) or from a seeded random init (`tiny`, and `sd15` for
benchmarks, which costs exactly what real weights cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Stable Diffusion v1.5's DDIM settings (its scheduler/scheduler_config.json).
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Preset:
    """Configs of every component, as diffusers/transformers constructor kwargs."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))
    lora_rank: int = 8
    tokenizer_max_length: int = 77


SD15 = Preset(
    name="sd15",
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    text_encoder={
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
)

# Same topology as SD1.5 (8x VAE, cross-attention UNet, CLIP text tower) at a size that runs
# a 1024x1024 tile through both stages on a CPU in seconds. Its images are noise-like.
TINY = Preset(
    name="tiny",
    unet={
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        # Attention only at 1/4 latent resolution: a 128x128 latent's 16k tokens cost minutes on CPU.
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    },
    text_encoder={
        "vocab_size": 514,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        # The offline tokenizer's <|startoftext|>/<|endoftext|> ids (CLIP pools at the eos token).
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
    },
)

# The tiny topology grown as far as two CPU cores train in minutes (bench/miniature.py): 256x256
# tiles, 32x32 latents, attention at the 8x8 level only (16x16 attention costs 40x per step on
# CPU). Trained weights of it ship in models/mini/ (UNets in float16, 10.9 MB in all).
MINI = Preset(
    name="mini",
    unet={**TINY.unet, "block_out_channels": (32, 64, 64), "cross_attention_dim": 64},
    vae={**TINY.vae, "block_out_channels": (8, 16, 32, 32)},
    text_encoder={**TINY.text_encoder, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64},
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, MINI, SD15)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        from .errors import InvalidInputError

        raise InvalidInputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
