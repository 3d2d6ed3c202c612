"""What a tile looks like: the synthesis settings of a job, with the paper's values as defaults.

A setting is written here once, as a field with its default and its range in `validate`: the
CLI's option takes its default from the field (`jobs/generate.py`), `GenerateConfig.synthesis`
holds the settings (so job.json records them and a resume checks them), and every sample's
`params` repeats them. No torch: the CLI and the Ray driver import this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError
from .cell_selection import CROP_SIZE, MAX_CELLS_PER_TILE

# How the models compute (`devices.model_dtype`; the training jobs' --precision too): not a synthesis
# setting (it changes pixels only at the rounding level), but the CLI needs the names without torch.
PRECISIONS = ("auto", "fp32", "bf16")
# The box an edited cell is annotated with: the box the editor painted it in (a detected normal
# cell's, the paper's), or the painted cell's own extent inside it, as labelled sets draw boxes.
ANNOTATED_BOXES = ("painted", "cell")
# An edit whose box holds no nucleus (`synth/edit_check.py`: glass or cytoplasm alone): kept with its
# label (the paper records every edit), or dropped: the cell is left as it was, a normal box.
EMPTY_EDITS = ("keep", "drop")


@dataclass(frozen=True)
class SynthesisSettings:
    tile_size: int = 1024
    steps: int = 25  # DDIM steps of both stages
    guidance: float = 5.0  # classifier-free guidance scale of both stages
    cells: tuple[int, int] = (1, 8)  # abnormal cells per tile, MIN-MAX
    class_weights: Mapping[str, float] | None = None  # relative class frequencies; None: uniform
    feather: int = 12  # px of blend margin around an edited box
    boxes: str = "painted"  # ANNOTATED_BOXES
    empty_edits: str = "keep"  # EMPTY_EDITS

    def validate(self) -> None:
        """Each setting in its range: a value that would fail mid-job, or quietly make a poisoned
        dataset (no denoising, no cells, NaN guidance), is one line before anything is written."""
        lo, hi = self.cells
        if not 0 <= lo <= hi <= MAX_CELLS_PER_TILE:
            raise InvalidInputError(f"--cells must be MIN-MAX with 0 <= MIN <= MAX <= {MAX_CELLS_PER_TILE}, got {lo}-{hi}")
        if self.steps < 1:
            raise InvalidInputError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.guidance):
            raise InvalidInputError(f"--guidance must be a finite number, got {self.guidance}")
        if self.class_weights is not None:
            weights = self.class_weights
            if not all(math.isfinite(w) and w >= 0 for w in weights.values()):
                raise InvalidInputError(f"--class-weights must be finite and >= 0, got {weights}")
            if not any(w > 0 for w in weights.values()):
                raise InvalidInputError(f"--class-weights needs at least one weight > 0, got {weights}")
        if self.tile_size % 8 or self.tile_size < CROP_SIZE:
            raise InvalidInputError(f"tile size must be a multiple of 8 and at least {CROP_SIZE}, got {self.tile_size}")
        if not 0 <= self.feather <= CROP_SIZE // 2:
            raise InvalidInputError(f"feather must be in [0, {CROP_SIZE // 2}] px, got {self.feather}")
        if self.boxes not in ANNOTATED_BOXES:
            raise InvalidInputError(f"--boxes must be one of {', '.join(ANNOTATED_BOXES)}, got {self.boxes!r}")
        if self.empty_edits not in EMPTY_EDITS:
            raise InvalidInputError(f"--empty-edits must be one of {', '.join(EMPTY_EDITS)}, got {self.empty_edits!r}")

    def record(self) -> dict[str, Any]:
        """As plain JSON (job.json): the tuple a list, the weights a dict."""
        return {
            "tile_size": self.tile_size,
            "steps": self.steps,
            "guidance": self.guidance,
            "cells": list(self.cells),
            "class_weights": dict(self.class_weights) if self.class_weights else None,
            "feather": self.feather,
            "boxes": self.boxes,
            "empty_edits": self.empty_edits,
        }

    def as_dict(self) -> dict[str, Any]:
        """A sample's `params`: the settings and the editor's crop size."""
        return {**self.record(), "crop_size": CROP_SIZE}
