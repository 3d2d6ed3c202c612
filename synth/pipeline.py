"""The per-tile pipeline: normal tile -> detection -> cell selection -> stage 2 -> paste-back.

`TileSynthesizer` turns a batch of (tile index, seed) pairs into annotated samples. Every random
choice of a tile comes from its own seed, so a tile's plan and boxes never depend on the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .abnormal import AbnormalCellSynthesizer
from .classes import CATEGORY_IDS
from .detector import CellDetector, load_detector
from .errors import InvalidInputError, named_as_urls
from .models import ModelBundle
from .normal import NormalTileGenerator
from .paste import crop_origin, box_in_crop, paste_back
from .phantom import draw_phantom_tile
from .seeding import rng_for, tile_seed
from .selection import CROP_SIZE, CellEdit, Plan, select_cells, unedited_boxes
from .settings import SynthesisSettings

# A normal-tile source maps (tile indices, seeds) to uint8 HxWx3 tiles.
NormalTileSource = Callable[[Sequence[int], Sequence[int]], Sequence[np.ndarray]]
# Stages timed by TileSynthesizer: normal tile (stage 1), detection + cell selection, the
# Abnormal Cell Synthesizer (stage 2), paste-back. Each ends in numpy arrays on the host, so on a
# GPU the wall time of a stage includes its kernels without an explicit synchronize.
SYNTHESIS_STAGES = ("stage1", "detection", "stage2", "paste_back")


@contextmanager
def timed(stage_seconds: MutableMapping[str, float] | None, stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``stage_seconds[stage]`` (no-op when None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if stage_seconds is not None:
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class TileSample:
    """One synthesized tile: the image and its annotation (the shard JSON of docs/design.md §3)."""

    tile_index: int
    seed: int
    image: np.ndarray
    annotation: dict[str, Any] = field(default_factory=dict)


def phantom_source(tile_size: int) -> NormalTileSource:
    """Procedurally drawn Pap-like tiles: real cells for the detector and editor to work on."""
    return lambda indices, seeds: [draw_phantom_tile(s, tile_size)[0] for s in seeds]


def diffusion_source(generator: NormalTileGenerator) -> NormalTileSource:
    return lambda indices, seeds: list(generator(seeds))


class TileSynthesizer:
    """Tile seeds in, annotated samples out: the paper's two stages over a batch of tiles."""

    def __init__(
        self,
        source: NormalTileSource,
        detector: CellDetector,
        editor: AbnormalCellSynthesizer,
        settings: SynthesisSettings = SynthesisSettings(),
        plan: Plan | None = None,
        source_kind: str = "synthetic",
        models: Mapping[str, str] | None = None,
    ) -> None:
        self.source, self.detector, self.editor = source, detector, editor
        self.settings, self.plan, self.source_kind = settings, plan, source_kind
        self.models = dict(models or {})

    def __call__(
        self,
        tile_indices: Sequence[int],
        seeds: Sequence[int],
        stage_seconds: MutableMapping[str, float] | None = None,
    ) -> list[TileSample]:
        """Synthesize a batch; with ``stage_seconds``, add each stage's seconds to it (SYNTHESIS_STAGES)."""
        size = self.settings.tile_size
        with timed(stage_seconds, "stage1"):
            tiles = [np.array(t, dtype=np.uint8, copy=True) for t in self.source(tile_indices, seeds)]
        for index, tile in zip(tile_indices, tiles):
            if tile.shape != (size, size, 3):
                raise InvalidInputError(f"tile {index}: normal tile is {tile.shape}, expected ({size}, {size}, 3)")
        with timed(stage_seconds, "detection"):
            detections = self.detector.detect(tiles)
            edits = [self._select(i, s, d) for i, s, d in zip(tile_indices, seeds, detections)]
        self._edit(tiles, seeds, edits, stage_seconds)
        return [
            TileSample(i, s, tile, self._annotation(i, s, e, unedited_boxes(d, e)))
            for i, s, tile, e, d in zip(tile_indices, seeds, tiles, edits, detections)
        ]

    def _select(self, index: int, seed: int, detected: np.ndarray) -> list[CellEdit]:
        s = self.settings
        rng = rng_for(seed, "selection")
        if self.plan is not None:
            return self.plan.edits_for(index, detected, rng, s.tile_size, s.cells, s.class_weights)
        return select_cells(detected, rng, s.tile_size, s.cells, s.class_weights)

    def _edit(
        self,
        tiles: list[np.ndarray],
        seeds: Sequence[int],
        edits: list[list[CellEdit]],
        stage_seconds: MutableMapping[str, float] | None = None,
    ) -> None:
        """Stage 2 for every cell of the batch in one editor call, then paste-back in place."""
        cells = [(t, j, e) for t, tile_edits in enumerate(edits) for j, e in enumerate(tile_edits)]
        if not cells:
            return
        origins = [crop_origin(e.box, self.settings.tile_size, CROP_SIZE) for _, _, e in cells]
        crops = np.stack(
            [tiles[t][top : top + CROP_SIZE, left : left + CROP_SIZE] for (t, _, _), (left, top) in zip(cells, origins)]
        )
        boxes = np.array([box_in_crop(e.box, o) for (_, _, e), o in zip(cells, origins)])
        # Cell j of a tile draws its noise from (tile seed, j): independent of the batch.
        cell_seeds = [tile_seed(seeds[t], j) for t, j, _ in cells]
        with timed(stage_seconds, "stage2"):
            edited = self.editor(crops, boxes, [e.label for _, _, e in cells], cell_seeds)
        with timed(stage_seconds, "paste_back"):
            for (t, _, e), origin, crop in zip(cells, origins, edited):
                others = [o.box for o in edits[t] if o is not e]
                paste_back(tiles[t], crop, origin, e.box, self.settings.feather, keep_out=others)

    def _annotation(self, index: int, seed: int, edits: list[CellEdit], normal: np.ndarray) -> dict[str, Any]:
        size = self.settings.tile_size
        return {
            "tile_index": int(index),
            "seed": int(seed),
            "width": size,
            "height": size,
            "boxes": [list(map(int, e.box)) for e in edits],
            "labels": [e.label for e in edits],
            "category_ids": [CATEGORY_IDS[e.label] for e in edits],
            "normal_boxes": [list(map(int, b)) for b in normal],
            "source": self.source_kind,
            "params": self.settings.as_dict(),
            "models": self.models,
        }


def build_synthesizer(
    bundle: ModelBundle,
    settings: SynthesisSettings,
    normal_source: str | NormalTileSource = "diffusion",
    plan: Plan | None = None,
    device: str = "cpu",
) -> TileSynthesizer:
    """Wire a bundle's models into a TileSynthesizer. `normal_source` is "diffusion",
    "phantom", or a callable (e.g. real tiles read from storage: the real-to-synthetic mode)."""
    components = (bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.scheduler)
    editor = AbnormalCellSynthesizer(bundle.acs_unet, *components, steps=settings.steps, guidance=settings.guidance)
    if normal_source == "diffusion":
        generator = NormalTileGenerator(
            bundle.unet, *components, tile_size=settings.tile_size, steps=settings.steps, guidance=settings.guidance
        )
        source, kind = diffusion_source(generator), "synthetic"
    elif normal_source == "phantom":
        source, kind = phantom_source(settings.tile_size), "synthetic"
    elif callable(normal_source):
        source, kind = normal_source, "real-to-synthetic"
    else:
        raise InvalidInputError(f"unknown normal source {normal_source!r}; choose diffusion, phantom or real")
    # Faster R-CNN sees tiles at their own size, as train-detector trains it (--image-size 1024),
    # not torchvision's default resize to 800.
    side = settings.tile_size
    with named_as_urls({bundle.detector_path: bundle.detector_source} if bundle.detector_path else {}):
        detector = load_detector(bundle.detector_path, device=device, min_size=side, max_size=side)
    return TileSynthesizer(
        source,
        detector,
        editor,
        settings,
        plan=plan,
        source_kind=kind,
        models={**bundle.fingerprints, "detector": bundle.fingerprints.get("detector", "classical")},
    )
