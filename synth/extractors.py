"""Feature extractors for FID/KID/IS, fed and called the way clean-fid feeds and calls its own.

Preprocessing is clean-fid's "clean" mode, through clean-fid's own resizer: each uint8 image
(the quantised pixels, as decoded) is resized to 299x299 per channel in float32 with PIL's
bicubic filter, clipped to [0, 255] and not quantised again; a batch is float NCHW in [0, 255].

Extractors (all loaded from bytes, nothing downloaded):

- ``inception``: clean-fid's Inception, the TorchScript file ``inception-2015-12-05.pt``.
  Features are its 2048-d pool features computed as clean-fid's ``InceptionV3W`` does in clean
  mode (``layers((x - 128) / 128)``); IS logits are its 1008-way output layer without bias, as
  the original IS and StyleGAN's metrics compute them.
- ``torchscript``: any TorchScript module; ``export``: any ``torch.export`` program (``.pt2``,
  exported with a dynamic batch dimension). Called on the batch as it is. It returns either a
  tensor (N, D) of features, or a pair ``(features (N, D), logits (N, C))``; only the pair
  gives IS, whose class probabilities are ``softmax(logits)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.resize import build_resizer

from .errors import InvalidInputError

EXTRACTOR_KINDS = ("inception", "torchscript", "export")
INPUT_SIZE = 299  # clean-fid resizes every image to 299x299 before any extractor
_clean_resize = build_resizer("clean")


def clean_resize(image: np.ndarray) -> torch.Tensor:
    """(3, 299, 299) float32 in [0, 255] from an HxWx3 uint8 image: clean-fid's clean mode."""
    return torch.from_numpy(_clean_resize(image).transpose(2, 0, 1).copy())


def clean_preprocess(images: Sequence[np.ndarray]) -> torch.Tensor:
    """A batch (N, 3, 299, 299) of ``clean_resize``d images, as clean-fid feeds its extractors."""
    return torch.stack([clean_resize(image) for image in images])


class CleanFIDInception(torch.nn.Module):
    """clean-fid's Inception (the TorchScript ``inception-2015-12-05.pt``): pool features and logits."""

    def __init__(self, base: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.layers = base.layers
        self.output_weight = base.output.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # clean-fid's InceptionV3W.forward with resize_inside=False: normalise, then the conv tower.
        features = self.layers((x - 128) / 128).reshape(x.shape[0], -1)
        return features, F.linear(features, self.output_weight)  # no bias: the original IS's logits


@dataclass
class FeatureExtractor:
    """A loaded extractor: ``extractor(batch) -> (features (N, D) float32, logits (N, C) or None)``."""

    kind: str
    module: torch.nn.Module
    device: torch.device
    sha256: str
    dim: int = 0  # feature dimension, found by the probe at load time
    num_classes: int = 0  # logits per image; 0 when the extractor gives none (no IS)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.module(batch.to(self.device))
        features, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
        return features.float().cpu(), None if logits is None else logits.float().cpu()


def load_feature_extractor(data: bytes, kind: str, name: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Load an extractor from its file's bytes and check it on two blank images.

    ``name`` (the path the user gave) only appears in error messages.
    """
    if kind not in EXTRACTOR_KINDS:
        raise InvalidInputError(f"unknown feature extractor kind {kind!r}; choose one of {', '.join(EXTRACTOR_KINDS)}")
    device = torch.device(device)
    try:
        if kind == "export":
            check_export_archive(data, name)  # torch.export.load would unpickle with weights_only=False
            module = torch.export.load(io.BytesIO(data)).module()
        else:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            if kind == "inception":
                module = CleanFIDInception(module)
        module = module.to(device)
        if kind != "export":  # exported programs have no train/eval mode to set
            module.eval()
    except InvalidInputError:
        raise
    except Exception as err:  # torch raises many types for a bad archive; the user needs one line
        raise InvalidInputError(f"cannot load feature extractor {name}: {_first_line(err)}") from None
    extractor = FeatureExtractor(kind, module, device, hashlib.sha256(data).hexdigest())
    _probe(extractor, name)
    return extractor


# Members of a torch.export .pt2 archive (under its root folder) that hold no pickle: metadata,
# the graph as JSON, raw tensor bytes, extra text files. Anything else is refused.
_PT2_METADATA = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_RAW_TENSORS = {"data/weights/": "weight_", "data/constants/": "tensor_"}


def check_export_archive(data: bytes, name: str) -> None:
    """Refuse a .pt2 archive that would make ``torch.export.load`` run a pickle.

    torch loads weights and constants marked ``use_pickle``, custom objects, legacy ``.pt``
    weight files and sample inputs it cannot read safely with full pickle (``weights_only=False``),
    i.e. arbitrary code. Only raw tensors, JSON and sample inputs that load with
    ``weights_only=True`` pass. Checked on the zip's members before torch sees the bytes.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise InvalidInputError(f"cannot load feature extractor {name}: not a .pt2 (zip) archive: {err}") from None
    roots = {member.split("/", 1)[0] for member in members}
    if len(roots) != 1 or not all("/" in m for m in members):
        raise InvalidInputError(f"cannot load feature extractor {name}: not a torch.export .pt2 archive (one root folder)")
    root = roots.pop() + "/"
    for member in members:
        if not member.endswith("/"):
            _check_export_member(archive, member, member[len(root):], name)


def _check_export_member(archive: zipfile.ZipFile, member: str, rel: str, name: str) -> None:
    def refuse(why: str) -> None:
        raise InvalidInputError(f"refusing feature extractor {name}: {rel} {why} (no input file may run code)")

    folder, base = posixpath.split(rel)
    if rel in _PT2_METADATA or rel.startswith("extra/") or folder == "models" and base.endswith(".json"):
        return
    if folder + "/" in _PT2_RAW_TENSORS:
        if base.endswith(".json"):
            try:
                config = json.loads(archive.read(member)).get("config", {})
                entries = list(config.values())
            except (ValueError, AttributeError, UnicodeDecodeError):
                refuse("is not a valid payload config")
            for entry in entries:
                if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                    refuse("marks a weight or constant as pickled")
                if not str(entry.get("path_name", "")).startswith(_PT2_RAW_TENSORS[folder + "/"]):
                    refuse(f"names a non-tensor payload {entry.get('path_name')!r}")
            return
        if base.startswith(_PT2_RAW_TENSORS[folder + "/"]) and not base.endswith(".pt"):
            return
        refuse("is a pickled payload")
    if folder == "data/sample_inputs" and base.endswith(".pt"):
        try:  # torch retries a failed safe load with full pickle: only a safe load may pass
            torch.load(io.BytesIO(archive.read(member)), weights_only=True)
        except Exception:
            refuse("needs full pickle to load")
        return
    refuse("is not a part of a torch.export program this loader accepts")


def _probe(extractor: FeatureExtractor, name: str) -> None:
    """Run two blank 299x299 images through; fill in ``dim`` and ``num_classes``."""
    batch = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    try:
        features, logits = extractor(batch)
    except Exception as err:
        raise InvalidInputError(
            f"feature extractor {name} fails on a batch of 2 float 3x{INPUT_SIZE}x{INPUT_SIZE} images: {_first_line(err)}"
        ) from None
    for what, out in (("features", features), ("logits", logits)):
        if out is not None and (out.ndim != 2 or out.shape[0] != 2):
            raise InvalidInputError(
                f"feature extractor {name} must return {what} of shape (N, D) for N images, got {tuple(out.shape)} for N=2"
            )
    extractor.dim, extractor.num_classes = features.shape[1], 0 if logits is None else logits.shape[1]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"
