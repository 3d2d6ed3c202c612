"""Phantom cells of all five classes, drawn from Bethesda features, in named stain styles.

`draw_labelled_tile` extends the NILM phantom (`phantom.py`) to a labelled set with known truth:
every squamous cell gets a box and a class, NILM or one of the four abnormal classes, and the
abnormal ones are drawn from the morphology cytologists use to call them. Feature ranges are
those of The Bethesda System for Reporting Cervical Cytology, 3rd ed. (R. Nayar, D. C. Wilbur,
eds., Springer 2015; chapters 5 "Epithelial Cell Abnormalities: Squamous"), expressed against
the phantom's own normal intermediate cell, as the atlas expresses them:

- ASC-US: nucleus ~2.5-3x the area of a normal intermediate nucleus, mild hyperchromasia,
  mature (intermediate/superficial) cytoplasm.
- LSIL: koilocyte, nucleus enlarged beyond 3x the intermediate area, often binucleate, a sharply
  outlined clear perinuclear cavity (halo) with condensed cytoplasm at its rim, hyperchromasia.
- ASC-H: small immature (metaplastic-sized) cell with a high nucleus-to-cytoplasm ratio,
  approaching that of HSIL.
- HSIL: small cell, very high N/C ratio, marked hyperchromasia, irregular nuclear outline
  (indentations, grooves), dense immature cytoplasm.

Styles change the stain (per-channel optical densities) and the glass, not the morphology:
`BASE_STYLES` are the many-style "general" domain (the stand-in for what SD1.5 has seen) and
`TARGET_STYLE` is the phantom's own Papanicolaou look, the one domain the LoRA is tuned to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import phantom as _ph
from .classes import ABNORMAL_CLASSES
from .seeding import rng_for

NILM = "NILM"
CELL_CLASSES: tuple[str, ...] = (NILM, *ABNORMAL_CLASSES)

# The phantom's normal intermediate nucleus (phantom._draw_cell: radius 5.5-9.5 px at 1024 scale).
NILM_NUCLEUS_RADIUS = (5.5, 9.5)
REFERENCE_NUCLEUS_AREA = np.pi * 7.5**2  # the mid-range intermediate nucleus, 1024-scale px^2


@dataclass(frozen=True)
class ClassFeatures:
    """How one class is drawn. Ranges are (low, high), sampled uniformly per cell.

    Nucleus size is given either as a multiple of `REFERENCE_NUCLEUS_AREA` (mature cells) or as a
    nucleus-to-cell area ratio `nc_ratio` (small immature cells, whose size the atlas gives that way)."""

    cell_radius: tuple[float, float] | None  # 1024-scale px; None: the tile's normal cell size
    nucleus_area_ratio: tuple[float, float] | None = None  # x REFERENCE_NUCLEUS_AREA (total, all nuclei)
    nc_ratio: tuple[float, float] | None = None  # nucleus area / cell area
    darkness: tuple[float, float] = (0.85, 1.15)  # x the style's nuclear optical density
    irregularity: tuple[float, float] = (0.0, 0.0)  # radial jitter of the nuclear outline (fraction)
    binucleate: float = 0.0  # probability of two nuclei
    halo: tuple[float, float] | None = None  # perinuclear clear zone, x the nuclear radius
    dense_cytoplasm: tuple[float, float] = (1.0, 1.0)  # x cytoplasm OD (immature cells stain denser)


# Bethesda 3rd ed. (2015), ch. 5; ranges against the phantom's intermediate cell (see module doc).
BETHESDA_FEATURES: dict[str, ClassFeatures] = {
    NILM: ClassFeatures(cell_radius=None, nucleus_area_ratio=((5.5 / 7.5) ** 2, (9.5 / 7.5) ** 2)),
    # "nuclei approximately 2.5 to 3 times the area of the nucleus of a normal intermediate
    # squamous cell ... slight hyperchromasia"
    "ASC-US": ClassFeatures(cell_radius=None, nucleus_area_ratio=(2.5, 3.0), darkness=(1.15, 1.35),
                            irregularity=(0.0, 0.05)),
    # "nuclear enlargement more than three times the area of normal intermediate nuclei ...
    # binucleation and multinucleation are common ... koilocytosis: a sharply delineated clear
    # perinuclear zone and a peripheral densely stained rim of cytoplasm"
    "LSIL": ClassFeatures(cell_radius=None, nucleus_area_ratio=(3.2, 4.5), darkness=(1.3, 1.6),
                          irregularity=(0.04, 0.10), binucleate=0.5, halo=(1.9, 2.5)),
    # "cells usually occur singly or in small fragments ... the size of metaplastic cells with
    # nuclei about 1.5 to 2.5 times larger than normal; N/C ratio may approach that of HSIL"
    "ASC-H": ClassFeatures(cell_radius=(24.0, 34.0), nc_ratio=(0.28, 0.42), darkness=(1.3, 1.55),
                           irregularity=(0.03, 0.08), dense_cytoplasm=(1.5, 1.9)),
    # "cells are smaller than LSIL cells ... marked increase in N/C ratio ... considerable
    # hyperchromasia ... nuclear contour quite irregular with prominent indentations or grooves"
    "HSIL": ClassFeatures(cell_radius=(18.0, 27.0), nc_ratio=(0.50, 0.70), darkness=(1.7, 2.1),
                          irregularity=(0.14, 0.24), dense_cytoplasm=(1.6, 2.0)),
}


@dataclass(frozen=True)
class Stain:
    """A stain/background style: optical densities (natural log, per RGB channel) and the glass."""

    name: str
    cyanophilic: tuple[float, float, float]
    eosinophilic: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    glass: tuple[float, float, float]
    eosinophilic_share: float = 0.3

    @property
    def caption(self) -> str:
        """The base domain's text prompt: the style, named."""
        return f"a smear stained with {self.name}"


# The phantom's own colours (phantom.py): the target domain.
TARGET_STYLE = Stain("papanicolaou", tuple(_ph._OD_CYANOPHILIC), tuple(_ph._OD_EOSINOPHILIC),
                     tuple(_ph._OD_NUCLEUS), (236.0, 233.0, 238.0))
# The many-style base domain; Papanicolaou is not among them, so only the LoRA learns it.
BASE_STYLES: tuple[Stain, ...] = (
    Stain("hematoxylin and eosin", (0.10, 0.42, 0.20), (0.05, 0.50, 0.22), (0.75, 0.95, 0.35), (244, 232, 238), 0.6),
    Stain("giemsa", (0.34, 0.22, 0.08), (0.20, 0.30, 0.10), (0.65, 1.15, 0.35), (232, 234, 244), 0.2),
    Stain("methylene blue", (0.50, 0.22, 0.06), (0.40, 0.18, 0.05), (1.25, 0.80, 0.28), (238, 242, 246), 0.1),
    Stain("diff-quik", (0.30, 0.34, 0.10), (0.22, 0.40, 0.12), (0.90, 1.15, 0.30), (240, 236, 240), 0.4),
    Stain("iron hematoxylin", (0.18, 0.18, 0.18), (0.14, 0.14, 0.14), (1.10, 1.10, 1.00), (238, 238, 236), 0.3),
    Stain("orange g", (0.05, 0.18, 0.45), (0.04, 0.14, 0.50), (0.70, 0.80, 0.70), (246, 240, 226), 0.5),
)
STYLES: dict[str, Stain] = {s.name: s for s in (TARGET_STYLE, *BASE_STYLES)}


@dataclass(frozen=True)
class CellRecord:
    """What was drawn for one cell, in full-resolution pixels: the truth the tests measure."""

    label: str
    box: tuple[int, int, int, int]
    cell_area: float  # cytoplasm polygon area
    nucleus_area: float  # drawn nuclear area (both nuclei when binucleate)
    darkness: float  # x the style's nuclear OD
    nuclei: int


@dataclass
class LabelledTile:
    image: np.ndarray  # uint8 (size, size, 3)
    boxes: np.ndarray  # int64 (N, 4) xyxy, x1/y1 exclusive, sorted by (y0, x0)
    labels: list[str]  # per box: NILM or an abnormal class
    style: Stain
    cells: list[CellRecord] = field(default_factory=list)  # in box order

    def abnormal(self) -> tuple[list[list[int]], list[str]]:
        """The abnormal boxes and their classes, as cytosynth annotations list them."""
        keep = [i for i, label in enumerate(self.labels) if label != NILM]
        return [self.boxes[i].tolist() for i in keep], [self.labels[i] for i in keep]

    def normal_boxes(self) -> list[list[int]]:
        return [b.tolist() for b, label in zip(self.boxes, self.labels) if label == NILM]


def draw_labelled_tile(
    seed: int,
    size: int = 512,
    *,
    scale: float = 0.5,
    style: Stain = TARGET_STYLE,
    abnormal: tuple[int, int] = (1, 3),
    classes: tuple[str, ...] = ABNORMAL_CLASSES,
) -> LabelledTile:
    """A phantom tile whose every squamous cell has a box and a class.

    `scale` is pixels per 1024-scale unit (phantom tiles of side 1024*scale have the cell count
    of a 1024 tile; `draw_phantom_tile(seed, 512)` is scale 0.5). Between `abnormal[0]` and
    `abnormal[1]` cells become abnormal, each of a class drawn uniformly from `classes`; the
    rest are NILM. Same arguments give identical bytes.
    """
    if size < 32:
        raise ValueError(f"phantom tiles need size >= 32, got {size}")
    unknown = set(classes) - set(ABNORMAL_CLASSES)
    if unknown or not classes:
        raise ValueError(f"classes must be among {ABNORMAL_CLASSES}, got {classes}")
    rng = rng_for(seed, "phantom-labelled")
    low = (size + 1) // 2
    area = (size / scale) ** 2  # the tile's area in 1024-scale units: cell counts follow it
    frac = area / 1024**2
    counts = (max(1, round(_ph.MIN_CELLS * frac)), max(1, round(_ph.MAX_CELLS * frac)))
    placed = _ph._place_cells(rng, size, scale, counts, area)
    n_abnormal = min(len(placed), int(rng.integers(abnormal[0], abnormal[1] + 1)))
    chosen = set(rng.choice(len(placed), n_abnormal, replace=False).tolist()) if n_abnormal else set()

    od = np.zeros((low, low, 3), np.float32)
    texture = _ph._smooth_noise(rng, low, cells_per_side=48)
    records = []
    for i, (center, radius) in enumerate(placed):
        label = str(rng.choice(classes)) if i in chosen else NILM
        records.append(_draw_cell(rng, od, center, radius, scale, size, texture, style, label))
    _ph._draw_small_things(rng, od, size, scale)
    image = _ph._expose(rng, od, _ph._background(rng, low, style.glass), size)

    order = sorted(range(len(records)), key=lambda i: (records[i].box[1], records[i].box[0]))
    records = [records[i] for i in order]
    boxes = np.array([r.box for r in records], dtype=np.int64).reshape(-1, 4)
    return LabelledTile(image, boxes, [r.label for r in records], style, records)


def _draw_cell(
    rng: np.random.Generator,
    od: np.ndarray,
    center: np.ndarray,
    radius: float,
    scale: float,
    size: int,
    texture: np.ndarray,
    style: Stain,
    label: str,
) -> CellRecord:
    """Add one cell of class `label` (cytoplasm, rim, halo, nuclei) to the half-resolution OD map."""
    f = BETHESDA_FEATURES[label]
    if f.cell_radius is not None:  # small immature cells: never larger than the slot placed for them
        radius = min(radius, rng.uniform(*f.cell_radius) * scale)
    polygon = _ph._cell_polygon(rng, center, radius)
    box = tuple(_ph._polygon_box(polygon, size))
    low = od.shape[0]
    pts = polygon / 2.0
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 3, low)
    cell_area = float(_shoelace(polygon))

    eosinophilic = f.cell_radius is None and rng.random() < style.eosinophilic_share
    stain = np.array(style.eosinophilic if eosinophilic else style.cyanophilic, np.float32)
    stain = stain * rng.uniform(0.75, 1.3) * rng.uniform(*f.dense_cytoplasm) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    rim_strength = rng.uniform(0.8, 1.4)

    # Nuclear size: total area from the class features, split over one or two nuclei.
    if f.nc_ratio is not None:
        nucleus_area = rng.uniform(*f.nc_ratio) * cell_area
    else:
        nucleus_area = rng.uniform(*f.nucleus_area_ratio) * REFERENCE_NUCLEUS_AREA * scale**2
    nuclei = 2 if rng.random() < f.binucleate else 1
    darkness = float(rng.uniform(*f.darkness))
    irregularity = rng.uniform(*f.irregularity)
    rn = np.sqrt(nucleus_area / nuclei / np.pi)  # full-resolution radius of each nucleus
    offset = rng.uniform(-0.25, 0.25, 2) * radius * (0.2 if f.nc_ratio is not None else 1.0)
    nc = center + offset
    angle = rng.uniform(0, np.pi)
    centres = [nc] if nuclei == 1 else [nc + s * 1.05 * rn * np.array([np.cos(angle), np.sin(angle)]) for s in (-1, 1)]

    if x1 > x0 and y1 > y0:
        fill_a, rim_a = _ph._cytoplasm_masks(pts, x0, y0, x1, y1)
        tex = 1.0 + 0.35 * texture[y0:y1, x0:x1, None]
        cytoplasm = fill_a * tex
        if f.halo is not None:
            # Koilocytic cavity: cytoplasm cleared around the nuclei, condensed at the cavity's sharp edge.
            reach = rn * rng.uniform(*f.halo) + (1.05 * rn if nuclei == 2 else 0.0)
            halo, edge = _halo_masks((x1 - x0, y1 - y0), (nc / 2.0) - (x0, y0), reach / 2.0, angle)
            cytoplasm = cytoplasm * (1.0 - 0.9 * halo) + fill_a * edge * 1.2
        od[y0:y1, x0:x1] += stain * (cytoplasm + rim_a * rim_strength)

    drawn_area = 0.0
    nuclear_od = np.array(style.nucleus, np.float32) * darkness
    for c in centres:
        drawn_area += _draw_nucleus(rng, od, c / 2.0, rn / 2.0, irregularity, nuclear_od)
    return CellRecord(label, box, cell_area, drawn_area * 4.0, darkness, nuclei)


def _draw_nucleus(rng: np.random.Generator, od: np.ndarray, center: np.ndarray, rn: float, irregularity: float,
                  nuclear_od: np.ndarray) -> float:
    """One nucleus (half-resolution centre and radius): an oval whose outline is jittered by
    `irregularity`, granular chromatin. Returns its drawn area in half-resolution pixels."""
    low = od.shape[0]
    k = 16
    angles = np.linspace(0, 2 * np.pi, k, endpoint=False)
    rho = 1.0 + irregularity * rng.uniform(-1.0, 1.0, k)
    squash, theta = rng.uniform(0.78, 1.0), rng.uniform(0, np.pi)
    # Squashed to an oval of the same area: the class features give the area.
    x, y = np.cos(angles) * rho * rn / np.sqrt(squash), np.sin(angles) * rho * rn * np.sqrt(squash)
    c, s = np.cos(theta), np.sin(theta)
    pts = np.stack([c * x - s * y, s * x + c * y], axis=1) + center
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 3, low)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in pts - (x0, y0)], fill=255)
    nuc_a = np.asarray(mask.filter(ImageFilter.BoxBlur(0.6)), np.float32)[..., None] / 255.0
    chromatin = 1.0 + 0.18 * rng.standard_normal(nuc_a.shape[:2] + (1,)).astype(np.float32)
    od[y0:y1, x0:x1] += nuclear_od * rng.uniform(0.9, 1.1) * nuc_a * chromatin
    return float(_shoelace(pts))


def _halo_masks(shape: tuple[int, int], center: np.ndarray, reach: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(cavity, edge) coverage maps (h, w, 1): an ellipse elongated along the nuclei's axis, and a
    thin ring at its border."""
    w, h = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    r = np.sqrt((u / reach) ** 2 + (v / (0.8 * reach)) ** 2)
    cavity = np.clip((1.0 - r) * reach, 0.0, 1.0)  # one-pixel ramp: a sharp edge
    edge = np.clip(1.0 - np.abs(r - 1.0) * reach / 1.5, 0.0, 1.0)
    return cavity[..., None], edge[..., None]


def _shoelace(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
