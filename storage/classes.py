"""The fixed abnormal-cell classes and their COCO category ids (DESIGN.md section 4).

synth keeps its own copy of the class list; the two packages never import each other.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("ASC-US", "ASC-H", "LSIL", "HSIL")  # the paper's order
CATEGORY_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASSES, start=1)}
NORMAL_LABEL = "NILM"  # normal cells: drawn in previews, never a COCO category


def category_id(label: str) -> int:
    """COCO category id of ``label``; ValueError naming the known classes otherwise."""
    try:
        return CATEGORY_IDS[label]
    except KeyError:
        raise ValueError(f"unknown cell class {label!r}; expected one of {', '.join(CLASSES)}") from None
