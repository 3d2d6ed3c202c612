"""Detector evaluation: COCO AP with pycocotools, reported like the paper's Table II.

Table II reports, in percent: AP averaged over IoU 0.50:0.95 (step 0.05) for each abnormal class,
mAP = the mean of those per-class APs, and mAP.5 / mAP.75 = the same mean at IoU 0.5 / 0.75; all
over all box areas with up to 100 detections per image (COCO's defaults). A class without ground
truth boxes has no AP (None) and, as in COCO, does not count in the means.

Plain data in, plain data out: ground truth and detections are per-image dicts of arrays, so any
detector and any data source can be scored. No storage, no Ray.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .detector import load_detector_model
from .errors import InvalidInputError

__all__ = ["SUMMARY_METRICS", "coco_metrics", "evaluate_detector", "load_detection_model", "object_classes", "predict"]

SUMMARY_METRICS = ("mAP", "mAP.5", "mAP.75")


def _coco(images: list[dict], annotations: list[dict], categories: Mapping[int, str]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in categories.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def _annotations(per_image: Sequence[Mapping[str, Any]], with_scores: bool) -> list[dict]:
    """COCO annotation records (bbox xywh) of per-image ``{"boxes" xyxy, "labels"[, "scores"]}``."""
    records = []
    for image_id, item in enumerate(per_image, start=1):
        boxes = np.asarray(item["boxes"], np.float64).reshape(-1, 4)
        labels = np.asarray(item["labels"], np.int64).reshape(-1)
        scores = np.asarray(item["scores"], np.float64).reshape(-1) if with_scores else None
        for j, ((x0, y0, x1, y1), label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            w, h = x1 - x0, y1 - y0
            record = {"id": len(records) + 1, "image_id": image_id, "category_id": label,
                      "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0}
            if with_scores:
                record["score"] = float(scores[j])
            records.append(record)
    return records


def _percent(values: np.ndarray) -> float | None:
    valid = values[values > -1]  # pycocotools marks "no ground truth" with -1
    return float(valid.mean()) * 100 if valid.size else None


def coco_metrics(
    ground_truth: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    categories: Mapping[int, str],
) -> dict[str, Any]:
    """Table II metrics (percent) of ``detections`` against ``ground_truth``, image by image.

    ``ground_truth[i]``: ``{"width", "height", "boxes": [N, 4] xyxy, "labels": [N]}``;
    ``detections[i]``: ``{"boxes", "labels", "scores"}`` for the same image; ``categories``:
    id -> name. Returns ``{"mAP", "mAP.5", "mAP.75", "AP": {name: AP}, "images", "boxes": {name: n}}``.
    """
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection lists")
    images = [{"id": i, "width": int(g["width"]), "height": int(g["height"])} for i, g in enumerate(ground_truth, 1)]
    gt_annotations = _annotations(ground_truth, with_scores=False)
    known = [a for a in _annotations(detections, with_scores=True) if a["category_id"] in categories]
    evaluator = COCOeval(_coco(images, gt_annotations, categories), _coco(images, known, categories), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    # precision[T iou, R recall, K class, A area, M max dets]; area "all" is 0, 100 dets is last.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    iou = evaluator.params.iouThrs
    class_ids = evaluator.params.catIds  # sorted category ids: the K axis
    counts = {i: 0 for i in categories}
    for record in gt_annotations:
        counts[record["category_id"]] = counts.get(record["category_id"], 0) + 1
    return {
        "mAP": _percent(precision),
        "mAP.5": _percent(precision[np.isclose(iou, 0.5)]),
        "mAP.75": _percent(precision[np.isclose(iou, 0.75)]),
        "AP": {categories[c]: _percent(precision[:, :, k]) for k, c in enumerate(class_ids)},
        "images": len(images),
        "boxes": {categories[c]: counts.get(c, 0) for c in class_ids},
    }


def load_detection_model(path: str | os.PathLike, device: str = "cpu", **model_kwargs: Any) -> torch.nn.Module:
    """The detector in a safetensors file (Faster R-CNN or RetinaNet, as its metadata says) in eval
    mode, with as many classes as the file has (``object_classes`` tells how many). ``model_kwargs``
    go to ``build_detector`` (e.g. ``min_size``)."""
    return load_detector_model(path, **model_kwargs).to(device).eval()


def object_classes(model: torch.nn.Module) -> int:
    """Object classes a torchvision Faster R-CNN or RetinaNet predicts, background excluded."""
    from torchvision.models.detection import RetinaNet

    if isinstance(model, RetinaNet):
        return model.head.classification_head.num_classes - 1
    return model.roi_heads.box_predictor.cls_score.out_features - 1


@torch.inference_mode()
def predict(model: torch.nn.Module, images: Sequence[torch.Tensor], device: str | torch.device = "cpu") -> list[dict]:
    """Detections of a torchvision-style detector as numpy ``{"boxes", "labels", "scores"}`` per image."""
    outputs = model([image.to(device) for image in images])
    return [{k: out[k].detach().cpu().numpy() for k in ("boxes", "labels", "scores")} for out in outputs]


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def evaluate_detector(
    model: torch.nn.Module,
    samples: Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    categories: Mapping[int, str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``(image, target)`` samples (CHW float in [0, 1]; target ``boxes`` xyxy,
    ``labels``) and score it with ``coco_metrics``. An empty set, or one without a single box of
    ``categories``, is an InvalidInputError: AP is undefined there."""
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    ground_truth: list[dict] = []
    detections: list[dict] = []
    with tqdm(total=total, desc="evaluating", unit="img", disable=not progress) as bar:
        for batch in _batches(samples, batch_size):
            detections += predict(model, [image for image, _ in batch], device)
            for image, target in batch:
                ground_truth.append({"width": image.shape[-1], "height": image.shape[-2],
                                     "boxes": target["boxes"].numpy(), "labels": target["labels"].numpy()})
            bar.update(len(batch))
    if not ground_truth:
        raise InvalidInputError("the evaluation set has no images")
    if not any(np.isin(g["labels"], list(categories)).any() for g in ground_truth):
        names = ", ".join(categories.values())
        raise InvalidInputError(f"the evaluation set's {len(ground_truth)} images have no boxes of {names}")
    return coco_metrics(ground_truth, detections, categories)
