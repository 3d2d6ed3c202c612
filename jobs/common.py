"""Helpers every job shares: whether a GPU is there (without torch), quiet libraries."""

from __future__ import annotations

import glob
import logging
import os
import sys
import warnings


def has_cuda_device() -> bool:
    """Whether this machine shows the process an NVIDIA GPU, told without torch (a Ray driver, which
    only picks what replicas reserve, stays light): a /dev/nvidiaN node that CUDA_VISIBLE_DEVICES
    does not hide."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def quiet_libraries() -> None:
    """Library chatter (dtype notes, config hints) would bury the progress bar and the errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars, read at import
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    # Not imported here (seconds and ~1 GB: `--help` and a Ray driver never load a model); where
    # already imported, their env variables were read, so their bars are switched off directly.
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        if name in sys.modules:
            sys.modules[name].disable_progress_bar()
