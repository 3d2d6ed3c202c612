"""Layering (DESIGN.md section 3): storage stands alone, without Ray, synth or torch."""

from __future__ import annotations

import subprocess
import sys


def test_storage_imports_neither_ray_nor_synth_nor_torch():
    code = (
        "import sys, cytosynth.storage, cytosynth.storage.preview, cytosynth.storage.reader\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}"
        " | {m for m in sys.modules if m.startswith('cytosynth.synth')}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
