"""The science: the paper's two-stage synthesis as plain PyTorch + diffusers (no Ray, no storage).

Callable on one device from a notebook::

    from cytosynth.synth import random_bundle, build_synthesizer, SynthesisSettings
    synthesizer = build_synthesizer(random_bundle("tiny").to("cpu"), SynthesisSettings(), "phantom")
    samples = synthesizer([0, 1], [11, 12])
"""

from .abnormal import AbnormalCellSynthesizer
from .classes import ABNORMAL_CLASSES, CATEGORY_IDS
from .detector import CellDetector, ClassicalCellDetector, FasterRCNNCellDetector, load_detector
from .errors import InvalidInputError
from .models import ModelBundle, load_bundle, random_bundle, save_bundle
from .normal import NormalTileGenerator
from .phantom import draw_phantom_tile
from .pipeline import SynthesisSettings, TileSample, TileSynthesizer, build_synthesizer
from .presets import PRESETS, Preset, get_preset
from .seeding import tile_seed
from .selection import CellEdit, Plan, load_plan, select_cells

__all__ = [
    "ABNORMAL_CLASSES",
    "CATEGORY_IDS",
    "PRESETS",
    "AbnormalCellSynthesizer",
    "CellDetector",
    "CellEdit",
    "ClassicalCellDetector",
    "FasterRCNNCellDetector",
    "InvalidInputError",
    "ModelBundle",
    "NormalTileGenerator",
    "Plan",
    "Preset",
    "SynthesisSettings",
    "TileSample",
    "TileSynthesizer",
    "build_synthesizer",
    "draw_phantom_tile",
    "get_preset",
    "load_bundle",
    "load_detector",
    "load_plan",
    "random_bundle",
    "save_bundle",
    "select_cells",
    "tile_seed",
]
