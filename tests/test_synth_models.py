"""The paper's model structure (Sections III-B, III-C) and the model bundle on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense

from cytosynth.jobs import cli
from cytosynth.synth import InvalidInputError, NormalTileGenerator, load_bundle, random_bundle, save_bundle
from cytosynth.synth.abnormal import ACS_INPUT_LAYOUT, ACS_LAYOUT_KEY
from cytosynth.synth.models import (
    SD_COMPONENTS,
    acs_unet_from_base,
    add_normal_lora,
    build_acs_unet,
    build_unet,
    merge_lora,
    save_normal_lora,
)
from cytosynth.synth.presets import SD15, TINY

LORA_TARGETS = {"to_q", "to_k", "to_v", "to_out.0"}


def lora_layers(unet):
    return {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A") and module.lora_A}


@pytest.fixture(scope="module")
def sd15_on_meta():
    """Full-size SD1.5 architecture without allocating weights."""
    with torch.device("meta"):
        unet = build_unet(SD15)
        add_normal_lora(unet, SD15.lora_rank)
        models = unet, build_acs_unet(SD15), AutoencoderKL(**SD15.vae)
    return models


def test_normal_lora_sits_only_on_cross_attention_qkv_out_with_rank_8(sd15_on_meta):
    unet, _, _ = sd15_on_meta
    layers = lora_layers(unet)
    transformer_blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(layers) == 4 * len(transformer_blocks) == 64
    for name, module in layers.items():
        block, _, projection = name.partition(".attn2.")
        assert projection in LORA_TARGETS, name
        assert module.r["normal"] == 8


def test_normal_lora_starts_with_gaussian_a_and_zero_b():
    unet = build_unet(TINY)
    add_normal_lora(unet, 8)
    for module in lora_layers(unet).values():
        assert torch.count_nonzero(module.lora_B["normal"].weight) == 0
        a = module.lora_A["normal"].weight
        assert a.std() > 0 and abs(a.mean()) < 3 * a.std() / a.numel() ** 0.5 + 0.05


def test_trainable_lora_parameters_are_the_only_trainable_ones():
    unet = build_unet(TINY)
    unet.requires_grad_(False)
    add_normal_lora(unet, 8)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".attn2." in n and ".lora_" in n for n in trainable)


def test_abnormal_cell_synthesizer_has_9_input_channels_and_gated_attention_in_every_block(sd15_on_meta):
    _, acs, _ = sd15_on_meta
    assert acs.conv_in.in_channels == 9
    blocks = [m for m in acs.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(isinstance(getattr(b, "fuser", None), GatedSelfAttentionDense) for b in blocks)
    assert acs.position_net.positive_len == 768  # CLIP phrase features of SD1.5's text tower


def test_gligen_gates_start_closed():
    acs = build_acs_unet(TINY)
    gates = [m for m in acs.modules() if isinstance(m, GatedSelfAttentionDense)]
    assert gates and all(g.alpha_attn.item() == 0 and g.alpha_dense.item() == 0 for g in gates)


@pytest.mark.slow  # measured 7-36 s on a loaded 2-core machine
def test_sd15_latents_are_128_for_a_tile_and_32_for_a_crop(sd15_on_meta):
    unet, acs, vae = sd15_on_meta
    with torch.device("meta"):
        assert vae.encode(torch.zeros(1, 3, 1024, 1024)).latent_dist.mean.shape == (1, 4, 128, 128)
        assert vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean.shape == (1, 4, 32, 32)
        tile = unet(torch.zeros(1, 4, 128, 128), 1, encoder_hidden_states=torch.zeros(1, 77, 768)).sample
        grounding = {"boxes": torch.zeros(1, 1, 4), "positive_embeddings": torch.zeros(1, 1, 768), "masks": torch.ones(1, 1)}
        crop = acs(torch.zeros(1, 9, 32, 32), 1, torch.zeros(1, 77, 768), cross_attention_kwargs={"gligen": grounding})
    assert tile.shape == (1, 4, 128, 128)
    assert crop.sample.shape == (1, 4, 32, 32)


def test_acs_initialised_from_sd15_unet_keeps_its_weights_and_zero_extra_channels():
    base = build_unet(TINY)
    acs = acs_unet_from_base(base)
    assert torch.equal(acs.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(acs.conv_in.weight[:, 4:]) == 0
    assert torch.equal(acs.down_blocks[-1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
                       base.down_blocks[-1].attentions[0].transformer_blocks[0].attn2.to_k.weight)


def _trained_lora_unet(seed: int = 1):
    torch.manual_seed(seed)
    unet = build_unet(TINY)
    add_normal_lora(unet, 8)
    for module in lora_layers(unet).values():  # pretend training moved B away from zero
        torch.nn.init.normal_(module.lora_B["normal"].weight, std=0.5)
    return unet


def _unet_out(unet):
    torch.manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=context).sample


def test_merging_the_lora_keeps_outputs_and_removes_adapter_layers():
    unet = _trained_lora_unet()
    before = _unet_out(unet)
    merge_lora(unet)
    assert not lora_layers(unet)
    torch.testing.assert_close(_unet_out(unet), before, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # measured 7-36 s on a loaded 2-core machine
def test_lora_file_loads_with_diffusers_load_lora_weights(tmp_path):
    unet = _trained_lora_unet()
    expected = _unet_out(unet)
    save_normal_lora(unet, tmp_path)
    bundle = random_bundle("tiny")
    base = build_unet(TINY)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora" not in k})
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=base,
        scheduler=bundle.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # measured 7-36 s on a loaded 2-core machine
def test_bundle_saved_to_disk_loads_back_and_generates_the_same_tiles(tmp_path):
    lora_unet = _trained_lora_unet()
    bundle = random_bundle("tiny")
    save_bundle(bundle, tmp_path / "bundle", lora_unet=lora_unet)
    loaded = load_bundle(str(tmp_path / "bundle"), preset="tiny")
    assert set(loaded.fingerprints) >= {"unet", "normal_lora", "acs_unet", "vae", "text_encoder"}
    merge_lora(lora_unet)
    for name, p in lora_unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], p, rtol=1e-5, atol=1e-6)

    def tiles(b):
        gen = NormalTileGenerator(b.unet, b.vae, b.text_encoder, b.tokenizer, b.scheduler, tile_size=256, steps=2)
        return gen([7])

    bundle.unet = lora_unet
    assert np.array_equal(tiles(loaded), tiles(bundle))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: __import__("shutil").rmtree(d / "unet"), "missing the unet/ folder"),
        (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64), "cannot load unet"),
        (lambda d: __import__("shutil").rmtree(d / "acs_unet"), "Abnormal Cell Synthesizer"),
    ],
    ids=["missing-component", "corrupt-weights", "missing-acs"],
)
def test_a_damaged_bundle_is_one_clear_error(tmp_path, damage, message):
    save_bundle(random_bundle("tiny"), tmp_path)
    damage(tmp_path)
    with pytest.raises(InvalidInputError, match=message) as err:
        load_bundle(str(tmp_path), preset="tiny")
    assert "\n" not in str(err.value)


def test_weights_are_never_unpickled(tmp_path):
    """A bundle holding only pickle (.bin) weights is refused, not loaded with torch.load."""
    save_bundle(random_bundle("tiny"), tmp_path)
    unet = tmp_path / "unet"
    torch.save({}, unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="cannot load unet"):
        load_bundle(str(tmp_path), preset="tiny")


def test_tiny_preset_is_reproducible_from_its_seed():
    a, b = random_bundle("tiny", seed=3), random_bundle("tiny", seed=3)
    for (name, p), q in zip(a.acs_unet.state_dict().items(), b.acs_unet.state_dict().values()):
        assert torch.equal(p, q), name


def test_random_weights_give_the_full_size_sd15_architecture_without_a_model_dir():
    from cytosynth.generation.generate_config import GenerateConfig
    from cytosynth.generation.synthesis import load_models

    with torch.device("meta"):  # the architecture, without allocating its 2 x 860M UNet weights
        bundle = load_models(GenerateConfig(out="unused", preset="sd15", random_weights=True))
    assert sum(p.numel() for p in bundle.unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert bundle.unet.config.block_out_channels == (320, 640, 1280, 1280) and bundle.unet.config.cross_attention_dim == 768
    assert bundle.acs_unet.config.in_channels == 9 and bundle.acs_unet.config.attention_type == "gated"
    assert set(bundle.fingerprints.values()) == {"random:sd15:seed=0"}  # recorded as random in job.json
    with pytest.raises(InvalidInputError, match="--random-weights"):
        load_models(GenerateConfig(out="unused", preset="sd15"))


@pytest.mark.slow  # two bundle loads: 10-15 s on a loaded 2-core machine
def test_bundle_loads_from_an_fsspec_url(tmp_path):
    import fsspec

    save_bundle(random_bundle("tiny"), tmp_path / "bundle")
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "bundle"), "/models/tiny", recursive=True)
    loaded = load_bundle("memory://models/tiny", preset="tiny")
    local = load_bundle(str(tmp_path / "bundle"), preset="tiny")
    assert loaded.fingerprints == local.fingerprints
    with pytest.raises(InvalidInputError, match="not found"):
        load_bundle("memory://models/nothing-here", preset="tiny")


@pytest.mark.slow  # two bundle loads: 10-15 s on a loaded 2-core machine
def test_bundle_loads_from_s3(tmp_path, s3_bucket, s3_server):
    import s3fs

    save_bundle(random_bundle("tiny"), tmp_path / "bundle")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).put(
        str(tmp_path / "bundle"), s3_bucket.removeprefix("s3://") + "/models/tiny", recursive=True)
    loaded = load_bundle(s3_bucket + "/models/tiny", preset="tiny")
    local = load_bundle(str(tmp_path / "bundle"), preset="tiny")
    assert loaded.fingerprints == local.fingerprints and set(loaded.fingerprints) >= {"unet", "acs_unet", "vae"}
    for part in ("unet", "acs_unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(local, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    with pytest.raises(InvalidInputError, match="not found"):
        load_bundle(s3_bucket + "/models/nothing-here", preset="tiny")


@pytest.mark.slow  # three bundle loads through moto S3
def test_a_bundle_on_s3_is_downloaded_once_per_machine_and_again_only_when_it_changes(tmp_path, s3_bucket, monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    cache = tmp_path / "cache"
    monkeypatch.setenv("CYTOSYNTH_CACHE", str(cache))
    save_bundle(random_bundle("tiny"), tmp_path / "bundle")
    url = s3_bucket + "/models/tiny"
    fs = s3fs.S3FileSystem()  # the instance load_bundle gets for s3:// URLs (fsspec caches it)
    fs.put(str(tmp_path / "bundle"), url, recursive=True)
    gets = []
    fs.connect()
    fs.s3.meta.events.register("before-call.s3.GetObject", lambda **kw: gets.append(1))

    first = load_bundle(url, preset="tiny")
    downloaded = len(gets)
    assert downloaded >= len(SD_COMPONENTS)  # the weights came through S3 GETs
    entries = list((cache / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "tiny" / "unet").is_dir()

    again = load_bundle(url, preset="tiny")  # a later run, or another replica on this node
    assert len(gets) == downloaded and list((cache / "models").iterdir()) == entries
    assert again.fingerprints == first.fingerprints

    changed = random_bundle("tiny", seed=1)
    save_bundle(changed, tmp_path / "changed")
    for file in (tmp_path / "changed" / "acs_unet").iterdir():  # overwrite one part in place
        fs.put_file(str(file), f"{url}/acs_unet/{file.name}")
    updated = load_bundle(url, preset="tiny")
    assert len(gets) > downloaded and len(list((cache / "models").iterdir())) == 2
    assert updated.fingerprints["acs_unet"] != first.fingerprints["acs_unet"]
    assert updated.fingerprints["unet"] == first.fingerprints["unet"]


# --------------------------------------------------------------------------- the ACS input layout


def acs_config(bundle_dir) -> dict:
    return json.loads((bundle_dir / "acs_unet" / "config.json").read_text())


def test_the_acs_unet_declares_gligens_input_layout_in_its_saved_config(tmp_path):
    save_bundle(random_bundle("tiny"), tmp_path)
    config = acs_config(tmp_path)
    assert config[ACS_LAYOUT_KEY] == ACS_INPUT_LAYOUT
    assert config[ACS_LAYOUT_KEY].startswith("gligen: [z_t, z0*mask, mask], mask 1 = background")
    assert load_bundle(str(tmp_path), preset="tiny").acs_unet.config[ACS_LAYOUT_KEY] == ACS_INPUT_LAYOUT


@pytest.mark.parametrize(
    "layout", [None, "sd-inpainting: [z_t, mask, z0*mask], mask 1 = hole"], ids=["undeclared", "another-layout"]
)
def test_a_9_channel_unet_of_another_layout_is_refused_on_load_by_generate(tmp_path, capsys, layout):
    """A diffusers GLIGEN inpainting UNet (or any 9-channel UNet that does not declare cytosynth's
    layout) would silently be fed the wrong channels: one line that says what is expected."""
    bundle = tmp_path / "bundle"
    save_bundle(random_bundle("tiny"), bundle)
    config = {k: v for k, v in acs_config(bundle).items() if k != ACS_LAYOUT_KEY}
    if layout is not None:
        config[ACS_LAYOUT_KEY] = layout
    (bundle / "acs_unet" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    capsys.readouterr()  # diffusers' "Writing model shards" bar from save_bundle
    code = cli.main(["generate", "--out", str(out), "--model-dir", str(bundle), "--preset", "tiny", "--num-tiles", "1",
                     "--normal-source", "phantom", "--tile-size", "256", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f'"{ACS_LAYOUT_KEY}": "{ACS_INPUT_LAYOUT}"' in err
    assert not out.exists() or not any(out.iterdir())  # nothing written (the writability probe is gone)
