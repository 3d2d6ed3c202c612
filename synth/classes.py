"""Abnormal cell classes and their fixed COCO category ids (the paper's order)."""

ABNORMAL_CLASSES: tuple[str, ...] = ("ASC-US", "ASC-H", "LSIL", "HSIL")

# Fixed forever: shards, manifests and COCO exports written by different versions must agree.
CATEGORY_IDS: dict[str, int] = {"ASC-US": 1, "ASC-H": 2, "LSIL": 3, "HSIL": 4}
