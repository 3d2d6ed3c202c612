"""Where the models run when the user does not say, and in which dtype."""

from __future__ import annotations

import torch

from .errors import InvalidInputError
from .settings import PRECISIONS


def default_device() -> str:
    """cuda when this process sees a GPU, else cpu (decided when a job runs, never at import)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dtype(precision: str, device: str) -> torch.dtype:
    """The diffusion models' torch dtype: `auto` is bf16 on CUDA (the GPU's fast matmuls) and fp32
    elsewhere (CPU runs stay byte-reproducible). The detector always runs in fp32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32
