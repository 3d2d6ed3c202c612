"""Layering (docs/design.md §1): storage stands alone, without Ray, synth or torch; synth (the
models) uses neither Ray nor storage."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_storage_imports_neither_ray_nor_synth_nor_torch():
    code = (
        "import sys, cytosynth.storage, cytosynth.storage.preview, cytosynth.storage.reader\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}"
        " | {m for m in sys.modules if m.startswith('cytosynth.synth')}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # measured 7-36 s on a loaded 2-core machine
def test_synth_imports_neither_ray_nor_storage():
    code = (
        "import importlib, pkgutil, sys, cytosynth.synth as synth\n"
        "for module in pkgutil.iter_modules(synth.__path__):\n"
        "    importlib.import_module(f'cytosynth.synth.{module.name}')\n"
        "print(len(list(pkgutil.iter_modules(synth.__path__))),"
        " sorted({m for m in sys.modules if m.split('.')[0] == 'ray' or m.startswith('cytosynth.storage')}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, found = result.stdout.strip().split(" ", 1)
    assert int(count) >= 15 and found == "[]", result.stdout  # every synth module was imported
