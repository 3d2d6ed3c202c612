"""Does an edit hold a cell? Every cell of every class has a nucleus, and an abnormal one's is at
least a normal one's size and as dark (The Bethesda System: ASC-US 2.5-3x a normal intermediate
nucleus, LSIL larger, ASC-H and HSIL a high nucleus-to-cytoplasm ratio). So an edited box holds a
cell when it holds a dark region at least half the size of the nucleus of the normal cell it
replaced, at that nucleus's darkness. The normal cell is the reference, so the check needs no
constant of a stain or a magnification. What it misses: a nucleus painted as fragments each under
half a normal one (some generated koilocytes), which it calls empty.
"""

from __future__ import annotations

import numpy as np

from .detector import optical_density

# An edit holds a cell when its largest dark region is at least this share of the replaced
# normal cell's nucleus: an abnormal nucleus is at least the normal one, with room for blur.
MIN_NUCLEUS_SHARE = 0.5


def largest_region(mask: np.ndarray) -> int:
    """Pixels in the largest connected region of `mask` (0 when it is empty)."""
    from scipy import ndimage

    parts, count = ndimage.label(mask)
    return int(np.bincount(parts.ravel())[1:].max()) if count else 0


def holds_a_nucleus(source: np.ndarray, edited: np.ndarray, box) -> bool:
    """Whether the box of `edited` holds a nucleus at least MIN_NUCLEUS_SHARE of the one the box
    of `source` (the same place before the edit: a normal cell) holds. Nuclear darkness: halfway
    from the box's typical density (glass and cytoplasm fill most of it) to its darkest 0.5%."""
    x0, y0, x1, y1 = (int(v) for v in box)
    before, after = optical_density(source[y0:y1, x0:x1]), optical_density(edited[y0:y1, x0:x1])
    typical = float(np.median(before))
    level = typical + 0.5 * (float(np.percentile(before, 99.5)) - typical)
    nucleus = largest_region(before > level)
    return largest_region(after > level) >= MIN_NUCLEUS_SHARE * nucleus
