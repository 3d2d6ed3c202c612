"""Helpers every job shares: the default device, quiet libraries."""

from __future__ import annotations

import logging
import os
import warnings


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_libraries() -> None:
    """Library chatter (dtype notes, config hints) would bury the progress bar and the errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    # Their env variables are read at import (already done); weight-loading bars are switched off here.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
