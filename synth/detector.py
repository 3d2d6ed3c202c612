"""NILM cell detectors: find the normal cells of a tile as boxes.

Two implementations behind one interface, ``detect(images) -> boxes per image``:

- ``FasterRCNNCellDetector``: the paper's in-house detector, torchvision Faster R-CNN
  (ResNet-50 FPN) with weights from a safetensors state dict (a RetinaNet file, as
  ``train-detector --arch retinanet`` writes, loads into it too: the file's metadata says which).
- ``ClassicalCellDetector``: no weights needed. Colour deconvolution (haematoxylin for nuclei),
  Otsu thresholds and a nucleus-seeded watershed, so the pipeline still works on real tiles when
  no trained detector is given.

Boxes are int64 (N, 4) xyxy pixel arrays, x1/y1 exclusive, inside the image, sorted by
(y0, x0, y1, x1) so "the i-th detected cell" means the same cell everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .errors import InvalidInputError


class CellDetector:
    """Interface: ``detect`` takes uint8 HxWx3 RGB images, returns NILM boxes per image."""

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


def sort_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes in canonical order: by y0, then x0, y1, x1."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 0], boxes[:, 1]))
    return boxes[order]


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InvalidInputError(f"expected a uint8 HxWx3 RGB image, got shape {shape} dtype {dtype}")


# --------------------------------------------------------------------------- classical


@dataclass(frozen=True)
class ClassicalParams:
    """Settings of the classical detector. Areas are fractions of the image area, so the same
    settings work at any tile size; the defaults fit 1024x1024 tiles at ~0.5 um/px."""

    work_scale: float = 0.5  # detect on a downscaled copy; cells are large, this halves the cost
    smooth_sigma: float = 1.0  # Gaussian blur (working pixels) before thresholding
    min_area: float = 0.0008  # drop regions smaller than this (lymphocytes, debris): ~840 px at 1024
    max_area: float = 0.05  # drop regions larger than this (clusters, smears): ~52k px at 1024
    min_nucleus_area: float = 0.00002  # nucleus fragments smaller than this are noise
    min_nucleus_multiple: float = 8.0  # drop regions smaller than this many times the tile's median
    # nucleus: a squamous cell is tens of times its nucleus, debris and lymphocytes are nucleus-sized.
    # Scale-free, so it holds where the area bounds (fractions of the tile) do not: crops of any size
    hysteresis: float = 0.5  # low threshold of the foreground, between background (0) and Otsu (1)
    merge_ratio: float = 0.95  # merge touching regions whose border is this deep relative to the
    # smaller one's centre (distance transform): one cell with two dark spots, not two cells


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Total optical density (natural log, summed over RGB): 0 on white glass, high where stain absorbs."""
    return -np.log((rgb.astype(np.float32, copy=False) + 1.0) / 256.0).sum(axis=2)


def _optical_density(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed RGB, its total optical density)."""
    rgb = ndi.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
    return rgb, optical_density(rgb)


def _foreground(image: np.ndarray, p: ClassicalParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(smoothed RGB, total optical density, cell mask) of a uint8 RGB image; the mask is empty
    on a blank image."""
    from skimage.filters import apply_hysteresis_threshold, threshold_otsu

    rgb, od = _optical_density(image, p.smooth_sigma)
    if np.ptp(od) < 1e-3:
        return rgb, od, np.zeros(od.shape, bool)
    # Hysteresis around Otsu: pale cells (thin cytoplasm) sit just above the background, so
    # pixels halfway between background level and Otsu join if connected to clear cell.
    t = threshold_otsu(od)
    bg_level = float(np.median(od[od <= t]))
    fg = apply_hysteresis_threshold(od, bg_level + p.hysteresis * (t - bg_level), t)
    fg = ndi.binary_opening(fg, iterations=2)
    return rgb, od, ndi.binary_fill_holes(fg)


MIN_PAINTED_SHARE = 0.02  # of its box: the smallest part painted_cell_boxes takes for a cell


def painted_cell_boxes(tile: np.ndarray, boxes, params: ClassicalParams | None = None) -> np.ndarray:
    """The extent of the cell painted into each box of ``tile`` (int64 (N, 4) xyxy, inside its box).

    The editor paints a cell anywhere inside the box it is given, often smaller than the box (an
    ASC-H or HSIL cell in a normal cell's box). Its extent: the part of the tile's stained pixels
    inside the box that holds the box's darkest point (the new cell's nucleus). Stained: above the
    Otsu split of the tile's optical density with its darkest 5% clipped, so that the dark nuclei
    of abnormal cells do not pull the split above pale cytoplasm. A box with no stained part of at
    least MIN_PAINTED_SHARE of it keeps its own extent."""
    from skimage.filters import threshold_otsu

    _check_image(tile)
    _, od = _optical_density(tile, (params or ClassicalParams()).smooth_sigma)
    if np.ptp(od) < 1e-3:
        return np.asarray(boxes, np.int64).reshape(-1, 4)  # blank tile
    fg = od > threshold_otsu(np.minimum(od, np.percentile(od, 95)))
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=2))
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, np.int64).reshape(-1, 4).tolist():
        parts, _ = ndi.label(fg[y0:y1, x0:x1])
        # Slivers (a neighbour's edge blurred into the box, specks) are not the painted cell.
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        inside = sizes[parts] >= MIN_PAINTED_SHARE * parts.size
        if not inside.any():
            out.append((x0, y0, x1, y1))
            continue
        dark = od[y0:y1, x0:x1]
        r, c = np.unravel_index(np.argmax(np.where(inside, dark, -np.inf)), dark.shape)
        # The nucleus's part, and any part around it: a koilocyte's halo can cut its nucleus off
        # its cytoplasm.
        around = [s for k, s in enumerate(ndi.find_objects(parts), start=1) if sizes[k] >= MIN_PAINTED_SHARE * parts.size
                  and s[0].start <= r < s[0].stop and s[1].start <= c < s[1].stop]
        out.append((x0 + min(s[1].start for s in around), y0 + min(s[0].start for s in around),
                    x0 + max(s[1].stop for s in around), y0 + max(s[0].stop for s in around)))
    return np.asarray(out, np.int64).reshape(-1, 4)


class ClassicalCellDetector(CellDetector):
    """Stain separation + Otsu + nucleus-seeded watershed, one box per cell.

    1. Foreground (cells) = Otsu threshold on total optical density, with hysteresis so pale
       cytoplasm connected to a clear cell joins it.
    2. Nuclei = upper threshold of a 3-class Otsu on the haematoxylin channel
       (``skimage.color.rgb2hed`` colour deconvolution) inside the foreground; each nucleus
       seeds one cell. Foreground blobs without a nucleus
       (anucleate squames, missed nuclei) get a seed of their own.
    3. Watershed on the negative distance transform of the foreground splits touching cells
       at their necks; regions split through their middle (two dark spots in one cell) are
       merged back.
    4. Regions outside the area bounds are dropped; each remaining region gives its box.
    """

    def __init__(self, params: ClassicalParams | None = None):
        self.params = params or ClassicalParams()

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        for image in images:
            _check_image(image)
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> np.ndarray:
        from skimage.color import rgb2hed
        from skimage.segmentation import watershed

        p = self.params
        h, w = image.shape[:2]
        small = image
        if p.work_scale != 1.0:
            # PIL's box filter: an area average, fast and deterministic.
            size = (max(1, round(w * p.work_scale)), max(1, round(h * p.work_scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.BOX))
        sh, sw = small.shape[:2]
        area = float(sh * sw)

        rgb, _, fg = _foreground(small, p)
        if not fg.any():
            return np.zeros((0, 4), np.int64)

        hema = rgb2hed(np.clip(rgb, 0, 255).astype(np.uint8))[..., 0]
        nuclei = np.zeros_like(fg)
        if np.ptp(hema[fg]) > 1e-6:
            nuclei = fg & (hema > _upper_threshold(hema[fg]))
        nuclei = ndi.binary_opening(nuclei)
        nuc_labels, n_nuc = ndi.label(nuclei)
        if n_nuc:
            sizes = ndi.sum_labels(nuclei, nuc_labels, index=np.arange(1, n_nuc + 1))
            keep = np.concatenate([[False], sizes >= p.min_nucleus_area * area])
            nuc_labels, n_nuc = ndi.label(keep[nuc_labels])

        # Blobs of foreground with no nucleus get a seed at their distance-transform peak.
        dist = ndi.distance_transform_edt(fg)
        comp, n_comp = ndi.label(fg)
        markers = nuc_labels.copy()
        has_seed = np.zeros(n_comp + 1, bool)
        has_seed[np.unique(comp[nuc_labels > 0])] = True
        unseeded = np.flatnonzero(~has_seed[1:]) + 1
        if len(unseeded):
            peaks = np.array(ndi.maximum_position(dist, comp, unseeded)).reshape(-1, 2)
            markers[peaks[:, 0], peaks[:, 1]] = n_nuc + 1 + np.arange(len(unseeded))

        labels = watershed(-dist, markers, mask=fg)
        labels = _merge_split_cells(labels, dist, p.merge_ratio)

        region_area = np.bincount(labels.ravel())
        smallest = p.min_area * area
        if n_nuc:
            smallest = max(smallest, p.min_nucleus_multiple * float(np.median(np.bincount(nuc_labels.ravel())[1:])))
        boxes = []
        for lab, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is not None and smallest <= region_area[lab] <= p.max_area * area:
                boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        if not boxes:
            return np.zeros((0, 4), np.int64)
        b = np.asarray(boxes, np.float64)
        b[:, [0, 2]] *= w / sw
        b[:, [1, 3]] *= h / sh
        out = np.stack(
            [np.floor(b[:, 0]), np.floor(b[:, 1]), np.ceil(b[:, 2]), np.ceil(b[:, 3])], axis=1
        ).astype(np.int64)
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
        return sort_boxes(out)


def _upper_threshold(values: np.ndarray) -> float:
    """Nuclei threshold on haematoxylin within the cells: the upper cut of a 3-class Otsu
    (background-ish / cytoplasm / nuclei). Plain Otsu would split the cytoplasm instead, since
    nuclei are only a few percent of the cell pixels."""
    from skimage.filters import threshold_multiotsu, threshold_otsu

    try:
        return float(threshold_multiotsu(values, classes=3)[-1])
    except ValueError:  # too few distinct values for three classes
        return float(threshold_otsu(values))


def _merge_split_cells(labels: np.ndarray, dist: np.ndarray, ratio: float) -> np.ndarray:
    """Merge adjacent watershed regions that meet without a neck.

    Two cells touching or overlapping meet at a saddle of the distance transform, well below
    the inscribed radius of either; one cell cut in two (a lymphocyte or a dark speck over it
    gave a second seed) has a border about as deep as the smaller part's centre. Merge when
    ``max(dist on border) >= ratio * min(peak dist of the two regions)``.
    """
    n = int(labels.max())
    if n < 2:
        return labels
    pairs = []
    for a, b, da, db in (
        (labels[:, :-1], labels[:, 1:], dist[:, :-1], dist[:, 1:]),
        (labels[:-1, :], labels[1:, :], dist[:-1, :], dist[1:, :]),
    ):
        touch = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[touch], b[touch]), np.maximum(a[touch], b[touch])
        pairs.append((lo * (n + 1) + hi, np.minimum(da[touch], db[touch])))
    key = np.concatenate([k for k, _ in pairs])
    if len(key) == 0:
        return labels
    depth = np.concatenate([d for _, d in pairs])
    uniq, inverse = np.unique(key, return_inverse=True)
    border = np.zeros(len(uniq))
    np.maximum.at(border, inverse, depth)
    peak = np.zeros(n + 1)
    peak[1:] = ndi.maximum(dist, labels, index=np.arange(1, n + 1))

    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k, b in zip(uniq.tolist(), border.tolist()):
        lo, hi = divmod(k, n + 1)
        if b >= ratio * min(peak[lo], peak[hi]):
            parent[find(hi)] = find(lo)
    roots = np.array([find(i) for i in range(n + 1)])
    return roots[labels]


# --------------------------------------------------------------------------- torchvision detectors

DETECTOR_ARCHS = ("fasterrcnn", "retinanet")  # torchvision's *_resnet50_fpn; DINO is not in torchvision
PRETRAINED_TRAINABLE_LAYERS = 3  # torchvision's default with a pretrained backbone (scratch: all 5)
BACKBONE = "ResNet-50"
_NORMS = ("batch", "frozen")  # nn.BatchNorm2d (from scratch) | FrozenBatchNorm2d (pretrained backbone)


def build_detector(arch: str = "fasterrcnn", num_classes: int = 2, *, backbone_state: dict | None = None,
                   frozen_norm: bool | None = None, **kwargs):
    """torchvision ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn``, built the way its builders
    build them, but with backbone weights passed in (nothing is ever downloaded).

    Without ``backbone_state``: random init, BatchNorm, every layer trainable (torchvision's
    ``weights_backbone=None``). With it (a torchvision ResNet-50 state dict, see
    ``read_backbone_weights``): FrozenBatchNorm2d and only the last 3 ResNet stages trainable, the
    weights loaded into the ResNet body before the FPN is put on it, as ``weights_backbone=`` does.
    ``frozen_norm`` overrides the norm layer (loading a trained file); ``kwargs`` go to the model
    (e.g. ``min_size``, ``max_size``)."""
    from torch import nn
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    check_arch(arch)
    pretrained = backbone_state is not None
    frozen = pretrained if frozen_norm is None else frozen_norm
    body = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    if pretrained:
        body.load_state_dict(backbone_state)
    trainable = PRETRAINED_TRAINABLE_LAYERS if frozen else 5
    if arch == "fasterrcnn":
        return FasterRCNN(_resnet_fpn_extractor(body, trainable), num_classes=num_classes, **kwargs)
    # RetinaNet skips P2 (too many anchors) and adds P6/P7, as retinanet_resnet50_fpn does.
    backbone = _resnet_fpn_extractor(body, trainable, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes, **kwargs)


def build_fasterrcnn(num_classes: int = 2, **kwargs):
    """torchvision ``fasterrcnn_resnet50_fpn`` with random init; nothing is downloaded.
    ``kwargs`` go to the model (e.g. ``min_size``, ``max_size``)."""
    return build_detector("fasterrcnn", num_classes, **kwargs)


def check_arch(arch: str) -> None:
    if arch not in DETECTOR_ARCHS:
        raise InvalidInputError(
            f"unknown --arch {arch!r}; choose one of {', '.join(DETECTOR_ARCHS)} (DINO is not in torchvision)"
        )


def detector_arch(model) -> str:
    from torchvision.models.detection import RetinaNet

    return "retinanet" if isinstance(model, RetinaNet) else "fasterrcnn"


def read_backbone_weights(data: bytes, name: str) -> dict:
    """A torchvision ResNet-50 state dict from safetensors bytes (never pickle); one-line
    InvalidInputError naming what was expected if the file is anything else. ``fc.*`` (the
    ImageNet classifier, unused by detectors) may be present or not."""
    import torch
    from safetensors.torch import load
    from torchvision.models import resnet50

    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"backbone weights {name} are not a readable safetensors file: {reason}") from None
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = _body_keys(resnet50(weights=None).state_dict())
    problem = _state_dict_mismatch(expected, _body_keys(state))
    if problem:
        raise InvalidInputError(
            f"backbone weights {name} are not a torchvision {BACKBONE} state dict "
            f"(expected keys like conv1.weight {tuple(expected['conv1.weight'].shape)}, "
            f"layer1.0.conv3.weight {tuple(expected['layer1.0.conv3.weight'].shape)}): {problem}"
        )
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _body_keys(state: dict) -> dict:
    """What the detector's ResNet body uses: no classifier, no BatchNorm step counters."""
    return {k: v for k, v in state.items() if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}


def save_detector(model, path: str | os.PathLike) -> None:
    """Write a detector's state dict as safetensors (the only format we load), with its
    architecture and norm layer in the file's metadata so loaders rebuild the same model."""
    from safetensors.torch import save_file
    from torchvision.ops.misc import FrozenBatchNorm2d

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    metadata = {"arch": detector_arch(model), "norm": "frozen" if frozen else "batch"}
    save_file(state, os.fspath(path), metadata=metadata)


def read_detector_file(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(state dict, metadata) of a detector file; files from before the metadata are Faster R-CNN
    with BatchNorm, the only detector then trained. Any problem is an InvalidInputError."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidInputError(f"detector weights not found: {path}")
    try:
        with safe_open(path, framework="pt") as weights:
            metadata = dict(weights.metadata() or {})
            state = {k: weights.get_tensor(k) for k in weights.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"detector weights {path} are not a readable safetensors file: {reason}") from None
    metadata.setdefault("arch", "fasterrcnn")
    metadata.setdefault("norm", "batch")
    if metadata["arch"] not in DETECTOR_ARCHS or metadata["norm"] not in _NORMS:
        raise InvalidInputError(
            f"detector weights {path} declare arch {metadata['arch']!r}, norm {metadata['norm']!r}; "
            f"expected one of {', '.join(DETECTOR_ARCHS)} with norm {' or '.join(_NORMS)}"
        )
    return state, metadata


def state_classes(state: dict, arch: str) -> int | None:
    """Classes (background included, as torchvision counts) of a detector state dict; None if the
    class logits are missing."""
    if arch == "fasterrcnn":
        logits = state.get("roi_heads.box_predictor.cls_score.weight")  # [classes, features]
        return None if logits is None else logits.shape[0]
    logits = state.get("head.classification_head.cls_logits.weight")  # [anchors x classes, ...]
    boxes = state.get("head.regression_head.bbox_reg.weight")  # [anchors x 4, ...]
    return None if logits is None or boxes is None else logits.shape[0] // (boxes.shape[0] // 4)


def load_detector_model(path: str | os.PathLike, num_classes: int | None = None, **model_kwargs):
    """The torchvision detector a file holds, rebuilt from its metadata (arch, norm); with
    ``num_classes`` None, as many classes as the file has. Any problem is an InvalidInputError."""
    path = os.fspath(path)
    state, metadata = read_detector_file(path)
    arch = metadata["arch"]
    classes = num_classes or state_classes(state, arch)
    if classes is None:
        raise InvalidInputError(f"detector weights {path} are not a {arch} state dict (no class logits)")
    model = build_detector(arch, classes, frozen_norm=metadata["norm"] == "frozen", **model_kwargs)
    problem = _state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise InvalidInputError(
            f"detector weights {path} do not match {arch}_resnet50_fpn(num_classes={classes}): {problem}"
        )
    model.load_state_dict(state)
    return model


class FasterRCNNCellDetector(CellDetector):
    """The paper's in-house detector: Faster R-CNN (or a RetinaNet file), boxes of class
    ``nilm_label`` with score >= ``score_threshold``. Images run in batches of ``batch_size`` on ``device``."""

    def __init__(self, model, device="cpu", score_threshold: float = 0.5, nilm_label: int = 1, batch_size: int = 4):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.score_threshold = score_threshold
        self.nilm_label = nilm_label
        self.batch_size = batch_size

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        device="cpu",
        num_classes: int = 2,
        score_threshold: float = 0.5,
        batch_size: int = 4,
        **model_kwargs,
    ) -> "FasterRCNNCellDetector":
        """Load a detector file (Faster R-CNN or RetinaNet, as its metadata says); any problem is
        an InvalidInputError."""
        model = load_detector_model(path, num_classes, **model_kwargs)
        return cls(model, device, score_threshold=score_threshold, batch_size=batch_size)

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        for image in images:
            _check_image(image)
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [
                    torch.from_numpy(np.ascontiguousarray(im)).to(self.device).permute(2, 0, 1).float() / 255.0
                    for im in images[start : start + self.batch_size]
                ]
                for im, out in zip(batch, self.model(batch)):
                    keep = (out["scores"] >= self.score_threshold) & (out["labels"] == self.nilm_label)
                    results.append(_to_int_boxes(out["boxes"][keep].cpu().numpy(), im.shape[2], im.shape[1]))
        return results


def _to_int_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Float xyxy -> int xyxy covering the float box, clipped, degenerate ones dropped."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int64)
    b = np.stack([np.floor(boxes[:, 0]), np.floor(boxes[:, 1]), np.ceil(boxes[:, 2]), np.ceil(boxes[:, 3])], 1)
    b = b.astype(np.int64)
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
    return sort_boxes(b)


def _state_dict_mismatch(expected: dict, got: dict) -> str:
    """One-line description of how ``got`` differs from ``expected``; empty if it matches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(got[k].shape)} vs {tuple(expected[k].shape)})"
        )
    return "; ".join(parts)


def load_detector(path: str | os.PathLike | None, device="cpu", **kwargs) -> CellDetector:
    """The torchvision detector in ``path`` (safetensors) if given, else the classical detector."""
    if path is None or path == "":
        return ClassicalCellDetector()
    return FasterRCNNCellDetector.from_file(path, device, **kwargs)
