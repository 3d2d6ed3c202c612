"""The phantom's colours as flat RGB (synth/phantom.py's optical densities over its glass): what a
failed edit paints into a box, for the tests of what counts as holding a cell."""

import numpy as np

GLASS = np.array([236, 233, 238], np.uint8)
CYTOPLASM = (GLASS * np.exp(-np.array([0.24, 0.13, 0.10]))).astype(np.uint8)  # cyanophilic
LYMPHOCYTE = (GLASS * np.exp(-np.array([1.10, 1.45, 0.75]))).astype(np.uint8)
NUCLEUS = (GLASS * np.exp(-np.array([0.85, 1.05, 0.55]) * 1.3)).astype(np.uint8)  # hyperchromatic
