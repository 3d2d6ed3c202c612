"""Assemble the miniature's trained models into a `--model-dir` bundle (README "Real weights" layout).

    bundle/ vae/ unet/ text_encoder/ tokenizer/ scheduler/   the base model (the SD1.5 stand-in)
            normal_lora/pytorch_lora_weights.safetensors     from cytosynth finetune-normal
            acs_unet/                                        from cytosynth finetune-abnormal
            classifier/cell_classifier.pt2                   the study's 5-class cell classifier (torch.export)
            MANIFEST.json                                    commands, data, git commit, sizes, sha256

The two UNets are stored in float16 (safetensors), which halves the bundle; diffusers loads them
back as float32 and `generate` computes in fp32 on CPU. Everything else is copied as written.
Also writes <out>/bundle_base (no LoRA: Table I's "base" arm) and <out>/acs_untrained (the ACS as
`finetune-abnormal` initialises it: gates at zero), both for the measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time

from safetensors.torch import load_file, save_file

from cytosynth.synth.models import acs_unet_from_base
from cytosynth.synth.ldm_training import load_sd_components

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _half_copy(src: str, dst: str) -> None:
    """A diffusers model folder with its safetensors weights cast to float16; config.json as is."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            save_file({k: v.half().contiguous() for k, v in load_file(os.path.join(src, name)).items()},
                      os.path.join(dst, name), metadata={"format": "pt"})
        else:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _files(root: str) -> dict[str, dict]:
    out = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name == "MANIFEST.json":
                continue
            data = open(path, "rb").read()
            out[os.path.relpath(path, root)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}
    return out


def assemble(out: str, base: str, lora: str, acs: str, records: dict, argv: list[str]) -> dict:
    bundle, bundle_base = os.path.join(out, "bundle"), os.path.join(out, "bundle_base")
    for target in (bundle, bundle_base):
        shutil.rmtree(target, ignore_errors=True)
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(os.path.join(base, part), os.path.join(target, part))
        _half_copy(os.path.join(base, "unet"), os.path.join(target, "unet"))
        _half_copy(os.path.join(acs, "acs_unet"), os.path.join(target, "acs_unet"))
    os.makedirs(os.path.join(bundle, "normal_lora"))
    shutil.copy2(os.path.join(lora, "pytorch_lora_weights.safetensors"), os.path.join(bundle, "normal_lora"))
    # The study's FID feature extractor travels with the bundle (tests/test_miniature.py uses it).
    os.makedirs(os.path.join(bundle, "classifier"))
    shutil.copy2(os.path.join(out, "classifier.pt2"), os.path.join(bundle, "classifier", "cell_classifier.pt2"))

    untrained = os.path.join(out, "acs_untrained")
    shutil.rmtree(untrained, ignore_errors=True)
    acs_unet_from_base(load_sd_components(base, "mini").unet).save_pretrained(untrained, safe_serialization=True)

    files = _files(bundle)
    manifest = {
        "what": "the cytosynth miniature: base model (pretrained on the phantom base domain), normal LoRA "
                "(cytosynth finetune-normal), Abnormal Cell Synthesizer (cytosynth finetune-abnormal); preset mini",
        "made_by": "python bench/miniature.py " + " ".join(argv),
        "git_commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "data": {"sizes": records["study"]["sizes"], "generator": "cytosynth.synth.phantom_classes.draw_labelled_tile",
                 "seed_blocks": "bench/mini_data.py SEED_BLOCKS"},
        "steps": {k: records[k] for k in ("base", "lora", "acs") if k in records},
        "storage": "unet/ and acs_unet/ weights float16 (loaded as float32); the rest float32",
        "use": "cytosynth generate --preset mini --model-dir models/mini --tile-size 1024 --normal-source phantom ...",
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }
    with open(os.path.join(bundle, "MANIFEST.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return {"bundle": bundle, "total_bytes": manifest["total_bytes"]}


def ship(bundle: str, target: str) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
