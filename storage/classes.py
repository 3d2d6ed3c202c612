"""The fixed abnormal-cell classes and their COCO category ids (docs/design.md §3).

synth keeps its own copy of the class list; the two packages never import each other.
"""

from __future__ import annotations

from typing import Any, Mapping

CLASSES: tuple[str, ...] = ("ASC-US", "ASC-H", "LSIL", "HSIL")  # the paper's order
CATEGORY_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASSES, start=1)}
NORMAL_LABEL = "NILM"  # normal cells (``normal_boxes``): a category only in the "all" label set
# What a detector (or a COCO export) is taught, one definition for the loader and export-coco:
# "abnormal": the edited cells, ids 1-4; "nilm": every cell as class 1 (the cell detector of stage 2:
# NILM boxes and edited cells, which are still cells); "all": ids 1-4 plus NILM as 5.
LABEL_SETS = ("abnormal", "nilm", "all")
NORMAL_CATEGORY_ID = len(CLASSES) + 1


def category_id(label: str) -> int:
    """COCO category id of ``label``; ValueError naming the known classes otherwise."""
    try:
        return CATEGORY_IDS[label]
    except KeyError:
        raise ValueError(f"unknown cell class {label!r}; expected one of {', '.join(CLASSES)}") from None


def check_label_set(labels: str) -> None:
    """ValueError unless ``labels`` is one of ``LABEL_SETS``."""
    if labels not in LABEL_SETS:
        raise ValueError(f"unknown label set {labels!r}; expected one of {', '.join(LABEL_SETS)}")


def label_categories(labels: str = "abnormal") -> dict[int, str]:
    """Category id -> name of a label set (``LABEL_SETS``)."""
    check_label_set(labels)
    if labels == "nilm":
        return {1: NORMAL_LABEL}
    abnormal = {i: name for name, i in CATEGORY_IDS.items()}
    return {**abnormal, NORMAL_CATEGORY_ID: NORMAL_LABEL} if labels == "all" else abnormal


def labelled_boxes(annotation: Mapping[str, Any], labels: str = "abnormal") -> tuple[list[list], list[int]]:
    """``(boxes xyxy, category ids)`` a label set takes from a sample annotation."""
    check_label_set(labels)
    boxes, normal = list(annotation.get("boxes", [])), list(annotation.get("normal_boxes", []))
    abnormal_ids = [category_id(label) for label in annotation.get("labels", [])]
    if labels == "abnormal":
        return boxes, abnormal_ids
    if labels == "nilm":
        return normal + boxes, [1] * (len(normal) + len(boxes))
    return boxes + normal, abnormal_ids + [NORMAL_CATEGORY_ID] * len(normal)
