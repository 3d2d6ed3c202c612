"""The science: the paper's two-stage synthesis as plain PyTorch + diffusers (no Ray, no storage).

Callable on one device from a notebook::

    from cytosynth.synth import random_bundle, build_synthesizer, SynthesisSettings
    synthesizer = build_synthesizer(random_bundle("tiny").to("cpu"), SynthesisSettings(), "phantom")
    samples = synthesizer([0, 1], [11, 12])
"""

import importlib

# Exported lazily (PEP 562): the CLI's parsers and the Ray driver read light names (the errors,
# the classes, the presets) and must not pay for importing torch and diffusers (seconds, ~1 GB).
_MODULES = {
    ".abnormal": ("AbnormalCellSynthesizer",),
    ".classes": ("ABNORMAL_CLASSES", "CATEGORY_IDS"),
    ".detector": ("CellDetector", "ClassicalCellDetector", "FasterRCNNCellDetector", "load_detector"),
    ".devices": ("default_device", "model_dtype"),
    ".errors": ("InvalidInputError",),
    ".models": ("ModelBundle", "load_bundle", "random_bundle", "save_bundle"),
    ".normal": ("NormalTileGenerator",),
    ".phantom": ("draw_phantom_tile",),
    ".pipeline": ("TileSample", "TileSynthesizer", "build_synthesizer"),
    ".presets": ("PRESETS", "Preset", "get_preset"),
    ".seeding": ("tile_seed",),
    ".cell_selection": ("CellEdit", "select_cells"),
    ".edit_plan": ("Plan", "load_plan", "plan_from_json"),
    ".settings": ("PRECISIONS", "SynthesisSettings"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted(_LAZY)
