"""Procedural Pap-smear phantom: thin-prep-like tiles with NILM squamous cells at known boxes.

The phantom is a normal-tile source for tests and demos: it gives the detector and the abnormal
cell editor real "cells" to work on without any weights or data. Rendering follows the
Beer-Lambert law: every stain layer adds optical density (OD), the tile is
``background * exp(-OD)``, so translucent cytoplasm darkens where cells overlap, as it does on
a real slide. Drawing happens at half resolution with PIL and is upscaled, which keeps a
1024x1024 tile well under 0.3 s on one core and gives the soft look of a scanned slide.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .seeding import rng_for

# Cell count per tile (NILM squamous cells with boxes).
MIN_CELLS, MAX_CELLS = 15, 40

# Optical densities per RGB channel (natural log), chosen so the colours match thin-prep
# Papanicolaou staining over a ~(236, 233, 238) background.
_OD_CYANOPHILIC = np.array([0.24, 0.13, 0.10], np.float32)  # pale cyan-blue (intermediate)
_OD_EOSINOPHILIC = np.array([0.07, 0.23, 0.16], np.float32)  # pink (superficial)
_OD_NUCLEUS = np.array([0.85, 1.05, 0.55], np.float32)  # dark blue-purple haematoxylin
_OD_LYMPHOCYTE = np.array([1.10, 1.45, 0.75], np.float32)
_OD_DEBRIS = np.array([0.55, 0.70, 0.60], np.float32)


def draw_phantom_tile(seed: int, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Draw a Pap-smear-like tile.

    Returns ``(image, boxes)``: ``image`` uint8 (size, size, 3) RGB and ``boxes`` int64 (N, 4)
    xyxy (x1, y1 exclusive), one per NILM squamous cell drawn (its cytoplasm extent clipped to
    the tile), sorted by (y0, x0). Lymphocytes and debris are drawn but have no box.
    Same seed and size give identical bytes.
    """
    if size < 32:
        raise ValueError(f"phantom tiles need size >= 32, got {size}")
    rng = rng_for(seed, "phantom")
    low = (size + 1) // 2  # drawing resolution
    scale = size / 1024.0  # cell sizes are specified at 1024

    cells = _place_cells(rng, size, scale)
    od = np.zeros((low, low, 3), np.float32)
    texture = _smooth_noise(rng, low, cells_per_side=48)  # cytoplasm granularity
    boxes = []
    for center, radius in cells:
        polygon = _cell_polygon(rng, center, radius)
        boxes.append(_polygon_box(polygon, size))
        _draw_cell(rng, od, polygon, center, radius, scale, texture)
    _draw_small_things(rng, od, size, scale)

    pixels = _expose(rng, od, _background(rng, low), size)
    boxes_arr = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    order = np.lexsort((boxes_arr[:, 0], boxes_arr[:, 1]))
    return pixels, boxes_arr[order]


def _expose(rng: np.random.Generator, od: np.ndarray, background: np.ndarray, size: int) -> np.ndarray:
    """The uint8 (size, size, 3) tile of a half-resolution OD map over `background` (Beer-Lambert)."""
    image_low = background * np.exp(-od)
    image = Image.fromarray(np.clip(image_low + 0.5, 0, 255).astype(np.uint8))
    image = image.resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(0.7))
    pixels = np.asarray(image, dtype=np.float32)
    # Sensor grain at full resolution, shared by the channels like a luminance noise.
    grain = rng.standard_normal((size, size, 1), dtype=np.float32) * 1.6
    return np.clip(pixels + grain + 0.5, 0, 255).astype(np.uint8)


def _place_cells(
    rng: np.random.Generator, size: int, scale: float, counts: tuple[int, int] = (MIN_CELLS, MAX_CELLS), area: float = 1024**2
) -> list[tuple[np.ndarray, float]]:
    """Rejection-sample cell centres and radii so cells touch at most slightly.

    `counts` is the range of cells and `area` the tile area they share, in 1024-scale units."""
    n = int(rng.integers(counts[0], counts[1] + 1))
    # Mean radius that covers ~30-40% of the tile with n cells, clamped to cell sizes that fit
    # the editor's 256 crop; fewer cells means bigger cells, as in sparse real smears.
    coverage = rng.uniform(0.30, 0.40)
    mean_r = float(np.clip(np.sqrt(coverage * area / (n * np.pi)), 36, 82)) * scale
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n):
        radius = mean_r * rng.uniform(0.75, 1.2)
        for attempt in range(80):
            if attempt and attempt % 20 == 0:
                radius *= 0.85  # crowded tile: try a smaller cell
            # Centres keep most of the cell inside the tile; edge cells are partly cut.
            margin = 0.45 * radius
            center = rng.uniform(margin, size - margin, size=2)
            # A minority of cells may sit closer, giving the touching/overlapping pairs of
            # real smears; most keep a gap.
            spacing = 0.70 if rng.random() < 0.3 else 0.92
            if all(np.hypot(*(center - c)) >= spacing * (radius + r) for c, r in placed):
                placed.append((center, radius))
                break
    return placed


def _cell_polygon(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """Irregular, slightly elongated polygon with rounded corners: a squamous cell outline."""
    k = int(rng.integers(6, 11))
    angles = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(-0.25, 0.25, k) * (2 * np.pi / k)
    rho = 1.0 + rng.uniform(-0.15, 0.12, k)
    ratio = rng.uniform(0.62, 1.0)
    theta = rng.uniform(0, np.pi)
    x, y = np.cos(angles) * rho * radius, np.sin(angles) * rho * radius * ratio
    c, s = np.cos(theta), np.sin(theta)
    pts = np.stack([c * x - s * y, s * x + c * y], axis=1) + center
    # One Chaikin pass rounds the corners a little; real cell borders are smooth with kinks.
    nxt = np.roll(pts, -1, axis=0)
    return np.concatenate([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)


def _polygon_box(polygon: np.ndarray, size: int) -> list[int]:
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int)
    return [max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)]


def _draw_cell(
    rng: np.random.Generator,
    od: np.ndarray,
    polygon: np.ndarray,
    center: np.ndarray,
    radius: float,
    scale: float,
    texture: np.ndarray,
) -> None:
    """Add one cell's cytoplasm, rim and nucleus to the half-resolution OD map in place."""
    low = od.shape[0]
    pts = polygon / 2.0
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 3, low)
    if x1 <= x0 or y1 <= y0:
        return
    fill_a, rim_a = _cytoplasm_masks(pts, x0, y0, x1, y1)

    stain = _OD_CYANOPHILIC if rng.random() < 0.7 else _OD_EOSINOPHILIC
    stain = stain * rng.uniform(0.75, 1.3) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    tex = 1.0 + 0.35 * texture[y0:y1, x0:x1, None]
    od[y0:y1, x0:x1] += stain * (fill_a * tex + rim_a * rng.uniform(0.8, 1.4))

    # Nucleus: small (NILM), near the centre, slightly oval, granular chromatin.
    rn = rng.uniform(5.5, 9.5) * scale / 2.0
    rn_y = rn * rng.uniform(0.75, 1.0)
    nc = center / 2.0 + rng.uniform(-0.25, 0.25, 2) * radius / 2.0
    nx0, ny0 = np.maximum(np.floor(nc - rn).astype(int) - 2, 0)
    nx1, ny1 = np.minimum(np.ceil(nc + rn).astype(int) + 3, low)
    if nx1 <= nx0 or ny1 <= ny0:
        return
    nuc = Image.new("L", (nx1 - nx0, ny1 - ny0), 0)
    cx, cy = nc[0] - nx0, nc[1] - ny0
    ImageDraw.Draw(nuc).ellipse([cx - rn, cy - rn_y, cx + rn, cy + rn_y], fill=255)
    nuc_a = np.asarray(nuc.filter(ImageFilter.BoxBlur(0.6)), np.float32)[..., None] / 255.0
    chromatin = 1.0 + 0.18 * rng.standard_normal(nuc_a.shape[:2] + (1,)).astype(np.float32)
    od[ny0:ny1, nx0:nx1] += _OD_NUCLEUS * rng.uniform(0.85, 1.15) * nuc_a * chromatin


def _cytoplasm_masks(pts: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (h, w, 1) in [0, 1] of a cell polygon (half-resolution points) and of its rim,
    over the window [y0:y1, x0:x1]."""
    local = [tuple(p) for p in (pts - (x0, y0))]
    fill = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(fill).polygon(local, fill=255)
    rim = Image.new("L", fill.size, 0)
    ImageDraw.Draw(rim).line(local + local[:1], fill=255, width=2)
    fill_a = np.asarray(fill, np.float32)[..., None] / 255.0
    # Soft rim: the edge of a flattened cell is thicker and folds, so it absorbs more.
    rim_a = np.asarray(rim.filter(ImageFilter.BoxBlur(1)), np.float32)[..., None] / 255.0
    return fill_a, rim_a


def _draw_small_things(rng: np.random.Generator, od: np.ndarray, size: int, scale: float) -> None:
    """A few lymphocytes (small dense round cells) and debris specks; they get no box."""
    low = od.shape[0]
    canvas = Image.new("L", (low, low), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 7))):
        cx, cy = rng.uniform(0, low, 2)
        r = rng.uniform(3.5, 5.0) * scale / 2.0
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    lymph = np.asarray(canvas.filter(ImageFilter.BoxBlur(0.6)), np.float32)[..., None] / 255.0
    canvas = Image.new("L", (low, low), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 31))):
        cx, cy = rng.uniform(0, low, 2)
        r = rng.uniform(0.5, 1.6) * max(scale, 0.5)
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=int(rng.integers(90, 256)))
    debris = np.asarray(canvas, np.float32)[..., None] / 255.0
    od += _OD_LYMPHOCYTE * lymph + _OD_DEBRIS * debris


def _background(rng: np.random.Generator, low: int, glass: tuple[float, float, float] = (236.0, 233.0, 238.0)) -> np.ndarray:
    """Pale pinkish or bluish-grey glass with faint blotches and vignetting, float (low, low, 3)."""
    tint = np.array(glass) + rng.uniform(-4, 4, 3)
    if rng.random() < 0.5:
        tint += (3.0, -2.0, 1.0)  # pinkish
    else:
        tint += (-3.0, 0.0, 3.0)  # bluish-grey
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32) / max(low - 1, 1) - 0.5
    vignette = 1.0 - rng.uniform(0.05, 0.10) * (xx**2 + yy**2) * 2.0
    blotches = 1.0 + 0.015 * _smooth_noise(rng, low, cells_per_side=6)
    return (tint.astype(np.float32) * (vignette * blotches)[..., None]).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells_per_side: int) -> np.ndarray:
    """Value noise in about [-1, 1]: a coarse random grid upsampled bicubically to size x size."""
    coarse = rng.uniform(-1, 1, (cells_per_side, cells_per_side)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
