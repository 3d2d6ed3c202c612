"""The miniature's domain feature extractor: a small 5-class cell classifier on real phantom crops.

The paper scores FID with "a ResNet-50 pre-trained on cytology"; here a small CNN trained on
256x256 crops centred on real phantom cells (NILM and the four abnormal classes) stands in for
it. It is exported as a `torch.export` program (.pt2: raw tensors and a JSON graph, no pickle),
the form `cytosynth fid --feature-extractor` reads. Called as the fid job calls it: a float batch
(N, 3, 299, 299) in [0, 255] (clean-fid's resize of the crop); it returns (features (N, 32) of
the penultimate layer, logits (N, 5) in `CELL_CLASSES` order).
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from torch import nn

from cytosynth.synth.extractors import clean_preprocess, load_feature_extractor
from cytosynth.synth.phantom_classes import CELL_CLASSES
from mini_pretrain import warmup_cosine

CENTRE = 150  # of the 299 input: the middle ~128 px of a 256 crop, where the centred cell is
POOL = 2  # the centre is averaged 2x2 before the convolutions: 75x75 inputs, cheap on CPU
FEATURES = 32


class Front(nn.Module):
    """The fixed part: centre window, 2x2 average, [0, 255] -> about [-1, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = (x.shape[-1] - CENTRE) // 2
        x = x[:, :, top : top + CENTRE, top : top + CENTRE]
        return nn.functional.avg_pool2d(x, POOL) / 127.5 - 1.0


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, FEATURES))
        self.head = nn.Linear(FEATURES, len(CELL_CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


class CellClassifier(nn.Module):
    def __init__(self, trunk: Trunk) -> None:
        super().__init__()
        self.front, self.trunk = Front(), trunk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trunk(self.front(x))


@torch.no_grad()
def fronted(crops: list[np.ndarray], batch: int = 64) -> torch.Tensor:
    """The crops as the trunk sees them: clean-fid preprocessing, then `Front`."""
    front = Front()
    return torch.cat([front(clean_preprocess(crops[i : i + batch])) for i in range(0, len(crops), batch)])


def train_classifier(crops: list[np.ndarray], labels: list[int], steps: int, seed: int, log) -> Trunk:
    """Class-balanced sampling (NILM outnumbers the rest), flips and quarter turns as augmentation."""
    x, y = fronted(crops), torch.tensor(labels)
    torch.manual_seed(seed)
    trunk = Trunk()
    counts = torch.bincount(y, minlength=len(CELL_CLASSES)).clamp(min=1).float()
    weights = (1.0 / counts)[y]
    opt = torch.optim.AdamW(trunk.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, 0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    trunk.train()
    for step in range(steps):
        idx = torch.multinomial(weights, 64, replacement=True, generator=gen)
        xb = x[idx]
        if torch.rand(1, generator=gen) < 0.5:
            xb = xb.flip(3)
        xb = torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
        loss = nn.functional.cross_entropy(trunk(xb)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    return trunk.eval()


def export_classifier(trunk: Trunk, path: str) -> None:
    model = CellClassifier(trunk).eval()
    program = torch.export.export(model, (torch.zeros(2, 3, 299, 299),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, path)


def predict(path: str, crops: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """Logits (N, 5) of the exported classifier, loaded the way the fid job loads it (pickle-free check included)."""
    with open(path, "rb") as fh:
        extractor = load_feature_extractor(fh.read(), "export", path)
    out = [extractor(clean_preprocess(crops[i : i + batch]))[1] for i in range(0, len(crops), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(CELL_CLASSES)))


def accuracy(logits: np.ndarray, labels: list[int], among: tuple[int, ...] | None = None) -> float:
    """Share of crops whose top class (among `among` class indices, default all) is the label."""
    if len(labels) == 0:
        return float("nan")
    if among is not None:
        masked = np.full_like(logits, -np.inf)
        masked[:, list(among)] = logits[:, list(among)]
        logits = masked
    return float((logits.argmax(axis=1) == np.asarray(labels)).mean())


__all__ = ["train_classifier", "export_classifier", "predict", "accuracy", "io"]
