"""The per-tile pipeline: normal tile -> detection -> cell selection -> stage 2 -> paste-back.

`TileSynthesizer` turns a batch of (tile index, seed) pairs into annotated samples, and a stream
of batches into a stream of samples with its CPU stages beside its device stages
(`TileSynthesizer.pipeline`, scheduled by `synth.schedule`). Every random choice of a tile comes
from its own seed, so a tile's plan and boxes never depend on the batch or on the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .abnormal import AbnormalCellSynthesizer
from .classes import CATEGORY_IDS
from .detector import CellDetector, load_detector, painted_cell_boxes
from .errors import InvalidInputError, named_as_urls
from .models import ModelBundle
from .normal import NormalTileGenerator
from .paste import crop_origin, box_in_crop, paste_back
from .phantom import draw_phantom_tile
from .schedule import PIPELINE_DEPTH, StageClock, Stages, pipelined
from .seeding import rng_for, tile_seed
from .cell_selection import CROP_SIZE, CellEdit, select_cells, unedited_boxes
from .edit_check import holds_a_nucleus
from .edit_plan import Plan
from .settings import SynthesisSettings

# A normal-tile source maps (tile indices, seeds) to uint8 HxWx3 tiles.
NormalTileSource = Callable[[Sequence[int], Sequence[int]], Sequence[np.ndarray]]
# Stages timed by TileSynthesizer: normal tile (stage 1), detection + cell selection (+ cutting
# the crops), the Abnormal Cell Synthesizer (stage 2), paste-back (+ the annotations). Each ends
# in numpy arrays on the host, so on a GPU the wall time of a stage includes its kernels without
# an explicit synchronize.
SYNTHESIS_STAGES = ("stage1", "detection", "stage2", "paste_back")




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


@dataclass
class _Batch:
    """A batch between stages, filled in stage by stage."""

    indices: Sequence[int]
    seeds: Sequence[int]
    tiles: list[np.ndarray]
    detections: list[np.ndarray] = field(default_factory=list)
    edits: list[list[CellEdit]] = field(default_factory=list)
    cells: list[tuple[int, int, CellEdit]] = field(default_factory=list)  # (tile of the batch, j, edit j of it)
    origins: list[tuple[int, int]] = field(default_factory=list)  # each cell's crop in its tile
    crops: np.ndarray | None = None  # stage 2's input, then its output


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
        """Synthesize a batch, stage after stage; with ``stage_seconds``, add each stage's
        seconds to it (SYNTHESIS_STAGES)."""
        [samples] = self.pipeline([(tile_indices, seeds)], stage_seconds, depth=0)
        return samples

    def pipeline(
        self,
        batches: Iterable[tuple[Sequence[int], Sequence[int]]],
        stage_seconds: MutableMapping[str, float] | None = None,
        idle_seconds: MutableMapping[str, float] | None = None,
        depth: int = PIPELINE_DEPTH,
    ) -> Iterator[list[TileSample]]:
        """The samples of each (tile indices, seeds) batch, in order, detection and paste-back on
        a thread of their own beside the diffusion stages (`synth.schedule`; depth 0: in series).
        Adds busy seconds per stage to ``stage_seconds``, waits on the stage before to ``idle_seconds``."""
        clock = StageClock({} if stage_seconds is None else stage_seconds, {} if idle_seconds is None else idle_seconds)
        stages = Stages(self._normal_tiles, self._detect, self._edit, self._paste)
        return pipelined(batches, stages, clock, depth)

    def _normal_tiles(self, batch: tuple[Sequence[int], Sequence[int]]) -> _Batch:
        """Stage 1 (device)."""
        indices, seeds = batch
        size = self.settings.tile_size
        tiles = [np.array(t, dtype=np.uint8, copy=True) for t in self.source(indices, seeds)]
        for index, tile in zip(indices, tiles):
            if tile.shape != (size, size, 3):
                raise InvalidInputError(f"tile {index}: normal tile is {tile.shape}, expected ({size}, {size}, 3)")
        return _Batch(indices, seeds, tiles)

    def _detect(self, batch: _Batch) -> _Batch:
        """Detection, cell selection and the cells' crops (CPU)."""
        batch.detections = self.detector.detect(batch.tiles)
        batch.edits = [self._select(i, s, d) for i, s, d in zip(batch.indices, batch.seeds, batch.detections)]
        batch.cells = [(t, j, e) for t, tile_edits in enumerate(batch.edits) for j, e in enumerate(tile_edits)]
        batch.origins = [crop_origin(e.box, self.settings.tile_size, CROP_SIZE) for _, _, e in batch.cells]
        if batch.cells:
            corners = zip((t for t, _, _ in batch.cells), batch.origins)
            batch.crops = np.stack([batch.tiles[t][y : y + CROP_SIZE, x : x + CROP_SIZE] for t, (x, y) in corners])
        return batch

    def _select(self, index: int, seed: int, detected: np.ndarray) -> list[CellEdit]:
        s = self.settings
        rng = rng_for(seed, "selection")
        if self.plan is not None:
            return self.plan.edits_for(index, detected, rng, s.tile_size, s.cells, s.class_weights)
        return select_cells(detected, rng, s.tile_size, s.cells, s.class_weights)

    def _edit(self, batch: _Batch) -> _Batch:
        """Stage 2 (device) for every cell of the batch in one editor call."""
        if not batch.cells:
            return batch
        boxes = np.array([box_in_crop(e.box, o) for (_, _, e), o in zip(batch.cells, batch.origins)])
        # Cell j of a tile draws its noise from (tile seed, j): independent of the batch.
        cell_seeds = [tile_seed(batch.seeds[t], j) for t, j, _ in batch.cells]
        batch.crops = self.editor(batch.crops, boxes, [e.label for _, _, e in batch.cells], cell_seeds)
        return batch

    def _paste(self, batch: _Batch) -> list[TileSample]:
        """Paste-back in place and the annotations (CPU). With --empty-edits drop, an edit whose box
        holds no nucleus is not pasted, and its cell stays a normal one."""
        dropped = set()
        for (t, j, e), origin, crop in zip(batch.cells, batch.origins, batch.crops if batch.cells else []):
            if self.settings.empty_edits == "drop" and not self._holds_a_cell(batch.tiles[t], crop, origin, e):
                dropped.add((t, j))
                continue
            # Other cells' boxes are kept out of this one's margin: a cell not yet pasted is still as it was.
            others = [o.box for o in batch.edits[t] if o is not e]
            paste_back(batch.tiles[t], crop, origin, e.box, self.settings.feather, keep_out=others)
        batch.edits = [[e for j, e in enumerate(edits) if (t, j) not in dropped] for t, edits in enumerate(batch.edits)]
        return [
            TileSample(i, s, tile, self._annotation(i, s, tile, e, unedited_boxes(d, e)))
            for i, s, tile, e, d in zip(batch.indices, batch.seeds, batch.tiles, batch.edits, batch.detections)
        ]

    @staticmethod
    def _holds_a_cell(tile: np.ndarray, crop: np.ndarray, origin: tuple[int, int], edit: CellEdit) -> bool:
        x, y = origin
        return holds_a_nucleus(tile[y : y + CROP_SIZE, x : x + CROP_SIZE], crop, box_in_crop(edit.box, origin))

    def _annotation(
        self, index: int, seed: int, tile: np.ndarray, edits: list[CellEdit], normal: np.ndarray
    ) -> dict[str, Any]:
        size = self.settings.tile_size
        painted = [list(map(int, e.box)) for e in edits]
        boxes = {"boxes": painted}
        if self.settings.boxes == "cell":  # the painted boxes stay: they bound the pixels an edit changed
            boxes = {"boxes": painted_cell_boxes(tile, painted).tolist(), "painted_boxes": painted}
        return {
            "tile_index": int(index),
            "seed": int(seed),
            "width": size,
            "height": size,
            **boxes,
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
