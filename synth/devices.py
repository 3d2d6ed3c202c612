"""Where the models run when the user does not say."""

from __future__ import annotations

import torch


def default_device() -> str:
    """cuda when this process sees a GPU, else cpu (decided when a job runs, never at import)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
