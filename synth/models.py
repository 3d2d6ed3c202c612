"""Model components and the model bundle: build from a preset, save, and load from a path or URL.

A bundle directory uses the formats people already have:

    <model-dir>/                      a diffusers Stable Diffusion v1.5 folder
        vae/ unet/ text_encoder/ tokenizer/ scheduler/
        normal_lora/pytorch_lora_weights.safetensors   the Normal Image Generator's LoRA
        acs_unet/                     the Abnormal Cell Synthesizer, a UNet2DConditionModel folder
                                      whose config declares its input layout
        detector/detector.safetensors optional torchvision Faster R-CNN state dict

Weights are read from safetensors only: no pickle ever comes from storage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .abnormal import ACS_INPUT_LAYOUT, ACS_LAYOUT_KEY, check_acs_layout
from .errors import InvalidInputError, named_as_urls
from .model_cache import cached_copy
from .presets import Preset, get_preset

# The paper's LoRA: the UNet's cross-attention (attn2) query, key, value and output projections.
NORMAL_LORA_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
LORA_FILE = "pytorch_lora_weights.safetensors"
DETECTOR_FILE = "detector.safetensors"
SD_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ModelBundle:
    """Every model the two stages use, ready for inference (LoRA merged into `unet`)."""

    preset: Preset
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    acs_unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    detector_path: str | None = None  # a local file (a copy of a remote one)
    detector_source: str | None = None  # what the user named (a URL), for messages
    fingerprints: dict[str, str] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "ModelBundle":
        for module in (self.vae, self.text_encoder, self.unet, self.acs_unet):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self


# --------------------------------------------------------------------------- building blocks


def offline_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges, built in code (nothing to download).

    Every byte is a token, so any prompt tokenizes; real bundles bring CLIP's own vocabulary.
    """
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_text_encoder(preset: Preset) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**preset.text_encoder))


def build_unet(preset: Preset) -> UNet2DConditionModel:
    return UNet2DConditionModel(**preset.unet)


def build_acs_unet(preset: Preset) -> UNet2DConditionModel:
    """The Abnormal Cell Synthesizer's UNet: 9 input channels and GLIGEN gated self-attention.

    Input channels are [noisy latent (4), masked latent (4), mask (1)] with mask 1 on the
    background, GLIGEN's inpainting layout (`abnormal.ACS_INPUT_LAYOUT`, declared in the config).
    diffusers' SD inpainting checkpoints use another order and polarity ([z_t, mask, masked z0],
    mask 1 = the hole), so they cannot seed it; an SD1.5 UNet can (`acs_unet_from_base`).
    `attention_type="gated"` adds a `GatedSelfAttentionDense` (gates tanh(alpha), alpha = 0 at
    init) ahead of the cross-attention of every transformer block, and the box + phrase
    projection `position_net`.
    """
    return declare_acs_layout(UNet2DConditionModel(**{**preset.unet, "in_channels": 9, "attention_type": "gated"}))


def declare_acs_layout(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Write the 9-channel input layout into the UNet's config (saved with it, checked on load)."""
    unet.register_to_config(**{ACS_LAYOUT_KEY: ACS_INPUT_LAYOUT})
    return unet


def acs_unet_from_base(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """Initialise the ACS UNet from an SD1.5 UNet, as SD inpainting checkpoints are made.

    The base weights are copied, the 5 extra input channels of `conv_in` start at zero, and the
    gated self-attention layers and `position_net` keep their fresh init (gates closed).
    """
    # Private keys dropped: `_use_default_values` would make from_config ignore attention_type.
    config = {**{k: v for k, v in base.config.items() if not k.startswith("_")}, "in_channels": 9, "attention_type": "gated"}
    acs = declare_acs_layout(UNet2DConditionModel.from_config(config).to(dtype=base.dtype))
    state = base.state_dict()
    conv_in = state.pop("conv_in.weight")
    missing, unexpected = acs.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(".fuser." in k or k.startswith("position_net.") or k == "conv_in.weight" for k in missing), missing
    with torch.no_grad():
        acs.conv_in.weight.zero_()
        acs.conv_in.weight[:, :4] = conv_in
    return acs


def normal_lora_config(rank: int = 8) -> LoraConfig:
    """LoRA of the Normal Image Generator: rank r on attn2 q/k/v/out, A Gaussian, B zero."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=NORMAL_LORA_TARGETS)


def add_normal_lora(unet: UNet2DConditionModel, rank: int = 8, adapter_name: str = "normal") -> None:
    unet.add_adapter(normal_lora_config(rank), adapter_name=adapter_name)


def save_normal_lora(unet: UNet2DConditionModel, directory: str | os.PathLike, adapter_name: str = "normal") -> Path:
    """Write the UNet's LoRA in diffusers format (`pipe.load_lora_weights` reads it)."""
    layers = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True)
    return Path(directory) / LORA_FILE


def merge_lora(unet: UNet2DConditionModel) -> None:
    """Fold LoRA deltas into the base weights and drop the adapter layers (free at inference)."""
    unet.fuse_lora()
    unet.unload_lora()


def load_normal_lora(unet: UNet2DConditionModel, path: str | os.PathLike) -> None:
    """Load a diffusers/peft/kohya LoRA file into `unet` and merge it."""
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path), weight_name=None)
    unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=network_alphas, adapter_name="normal")
    merge_lora(unet)


# --------------------------------------------------------------------------- bundles


def random_bundle(preset: str | Preset = "tiny", seed: int = 0) -> ModelBundle:
    """Random-init models of a preset, reproducible from `seed` (tests, demo, benchmarks)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    with _seeded(seed):
        vae = AutoencoderKL(**preset.vae)
        text_encoder = build_text_encoder(preset)
        unet = build_unet(preset)
        add_normal_lora(unet, preset.lora_rank)
        acs_unet = build_acs_unet(preset)
        # Open the GLIGEN gates a little so the random ACS actually uses its grounding tokens.
        for module in acs_unet.modules():
            if hasattr(module, "alpha_attn"):
                module.alpha_attn.data.fill_(0.5)
                module.alpha_dense.data.fill_(0.5)
    merge_lora(unet)
    tag = f"random:{preset.name}:seed={seed}"
    return ModelBundle(
        preset=preset,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=offline_tokenizer(preset.tokenizer_max_length),
        unet=unet,
        acs_unet=acs_unet,
        scheduler=DDIMScheduler(**preset.scheduler),
        fingerprints={name: tag for name in ("vae", "text_encoder", "unet", "acs_unet")},
    )


def save_bundle(bundle: ModelBundle, directory: str | os.PathLike, lora_unet: UNet2DConditionModel | None = None) -> Path:
    """Write a bundle in the layout `load_bundle` reads (the LoRA only when given unmerged)."""
    directory = Path(directory)
    bundle.vae.save_pretrained(directory / "vae")
    bundle.text_encoder.save_pretrained(directory / "text_encoder")
    bundle.tokenizer.save_pretrained(directory / "tokenizer")
    bundle.scheduler.save_pretrained(directory / "scheduler")
    bundle.acs_unet.save_pretrained(directory / "acs_unet")
    if lora_unet is not None:
        base = copy.deepcopy(lora_unet)
        base.unload_lora()  # the SD folder holds base weights; the LoRA goes beside them
        base.save_pretrained(directory / "unet")
        save_normal_lora(lora_unet, directory / "normal_lora")
    else:
        bundle.unet.save_pretrained(directory / "unet")
    return directory


def load_bundle(
    model_dir: str,
    preset: str = "sd15",
    lora: str | None = None,
    acs_unet: str | None = None,
    detector: str | None = None,
) -> ModelBundle:
    """Load a bundle from a local path or an fsspec URL (copied once per machine: `model_cache`).

    `lora`, `acs_unet` and `detector` override the bundle's own sub-paths. Any missing or
    unreadable part raises `InvalidInputError` naming it.
    """
    root = localize(model_dir)
    lora_path = localize(lora) if lora else root / "normal_lora" / LORA_FILE
    acs_path = localize(acs_unet) if acs_unet else root / "acs_unet"
    detector_path = localize(detector) if detector else root / "detector" / DETECTOR_FILE
    # Copies of remote parts are temporary folders; what the user reads names their URLs.
    copies = {str(root): model_dir, str(lora_path): lora, str(acs_path): acs_unet, str(detector_path): detector}
    with named_as_urls(copies):
        return _load_local_bundle(model_dir, preset, lora, acs_unet, detector, root, lora_path, acs_path, detector_path)


def _load_local_bundle(
    model_dir: str, preset: str, lora: str | None, acs_unet: str | None, detector: str | None,
    root: Path, lora_path: Path, acs_path: Path, detector_path: Path,
) -> ModelBundle:
    """`load_bundle` once every part is a local path (the arguments name what the user gave)."""
    for name in SD_COMPONENTS:
        require_path(root / name, f"model bundle {model_dir}: missing the {name}/ folder of a diffusers SD1.5 model")
    require_path(acs_path / "config.json", f"model bundle {model_dir}: missing the Abnormal Cell Synthesizer folder {acs_path}")

    def load(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure to read weights is one user-facing line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InvalidInputError(f"cannot load {what} from {model_dir}: {reason}") from err

    # Before any weights are read: a UNet of another layout is refused at once.
    check_acs_layout(load("acs_unet config", _read_json, acs_path / "config.json"), acs_unet or f"{model_dir}/acs_unet")
    vae = load("vae", AutoencoderKL.from_pretrained, root, subfolder="vae", use_safetensors=True)
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained, root / "text_encoder", use_safetensors=True)
    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained, root / "tokenizer")
    scheduler_config = load("scheduler", DDIMScheduler.load_config, root, subfolder="scheduler")
    unet = load("unet", UNet2DConditionModel.from_pretrained, root, subfolder="unet", use_safetensors=True)
    if lora_path.exists():
        load("normal LoRA", load_normal_lora, unet, lora_path)
    elif lora:
        raise InvalidInputError(f"normal LoRA not found: {lora}")
    with _quiet_diffusers():  # it warns that the layout key is not an __init__ argument
        acs = load("acs_unet", UNet2DConditionModel.from_pretrained, acs_path, use_safetensors=True)
    if detector and not detector_path.exists():
        raise InvalidInputError(f"detector weights not found: {detector}")

    return ModelBundle(
        preset=get_preset(preset),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        acs_unet=acs,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        detector_path=str(detector_path) if detector_path.exists() else None,
        detector_source=detector or f"{model_dir.rstrip('/')}/detector/{DETECTOR_FILE}",
        fingerprints={
            "vae": fingerprint(root / "vae"),
            "text_encoder": fingerprint(root / "text_encoder"),
            "unet": fingerprint(root / "unet"),
            "normal_lora": fingerprint(lora_path) if lora_path.exists() else "none",
            "acs_unet": fingerprint(acs_path),
            **({"detector": fingerprint(detector_path)} if detector_path.exists() else {}),
        },
    )


# --------------------------------------------------------------------------- helpers


class _seeded:
    """Seed torch's global RNG for random init, restoring the caller's RNG state afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self._state)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def require_path(path: Path, message: str) -> None:
    """InvalidInputError(message) unless `path` exists: a bundle's missing part named in one line."""
    if not path.exists():
        raise InvalidInputError(message)


def localize(url: str) -> Path:
    """A local path for `url`: itself if local, else the node's cached copy of the remote file or folder."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return cached_copy(url)


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex) over the weight files of a file or folder: names what produced a tile."""
    path = Path(path)
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.suffix in {".safetensors", ".json"})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
