"""`cytosynth eval-detector` (COCO AP of a detector, the paper's Table II) and
`cytosynth augmentation-study` (real vs real + synthetic training, same held-out set)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cytosynth import storage
from cytosynth.synth import InvalidInputError
from cytosynth.synth.evaluation import SUMMARY_METRICS, evaluate_detector, load_detection_model, object_classes

from .common import default_device

LABEL_SETS = ("abnormal", "nilm")  # storage.LABEL_SETS, spelled out: it would import torch at CLI start


def _add_eval_data(parser: argparse.ArgumentParser, what: str) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help=f"{what} as labelled shards: a job output, .tar, brace pattern or glob (or s3://)")
    data.add_argument("--coco", help=f"{what} as a COCO detection JSON (categories matched by name)")
    parser.add_argument("--images", help="image folder of --coco (default: the JSON's folder)")
    parser.add_argument("--labels", choices=LABEL_SETS, default="abnormal",
                        help="abnormal: ASC-US, ASC-H, LSIL, HSIL; nilm: every cell as one class")
    parser.add_argument("--image-size", type=int, default=1024,
                        help="side the detector resizes images to; as in train-detector (default 1024)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--batch-size", type=int, default=4, help="images per detector call")
    parser.add_argument("--json", help="also write the metrics here as JSON (a path or URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser("eval-detector", help="COCO AP of a Faster R-CNN detector on a labelled set (Table II)")
    ev.add_argument("--detector", required=True, help="Faster R-CNN state dict (safetensors); classes from the file")
    _add_eval_data(ev, "the labelled set")
    ev.set_defaults(run=eval_detector)


def _samples(args: argparse.Namespace) -> tuple[Iterator[Any], int | None]:
    """(samples, their count if known) of --data or --coco."""
    if args.coco:
        return storage.coco_detection_samples(args.coco, args.images, args.labels), None
    if args.images:
        raise InvalidInputError("--images goes with --coco")
    shards = storage.resolve_shards(args.data)
    return storage.shard_detection_samples(shards, args.labels), storage.count_samples(shards)


def evaluate(args: argparse.Namespace, detector: str) -> dict[str, Any]:
    """Table II metrics of the detector file on the set named by ``args`` (--data/--coco, --labels)."""
    categories = storage.detection_categories(args.labels)
    samples, total = _samples(args)
    model = load_detection_model(detector, args.device, min_size=args.image_size, max_size=args.image_size)
    if object_classes(model) != len(categories):
        raise InvalidInputError(
            f"detector {detector} predicts {object_classes(model)} object classes but --labels {args.labels} "
            f"scores {len(categories)} ({', '.join(categories.values())})"
        )
    return evaluate_detector(model, samples, categories, device=args.device, batch_size=args.batch_size,
                             progress=not args.quiet, total=total)


def eval_detector(args: argparse.Namespace) -> int:
    metrics = evaluate(args, args.detector)
    name = os.path.basename(args.detector)
    print(f"cytosynth eval-detector: {describe_set(metrics)} from {_samples_name(args)}")
    print(format_table([(name, metrics)], "Detector"))
    if args.json:
        report = {"detector": args.detector, "data": _samples_name(args), "labels": args.labels,
                  "units": "AP x 100 (the paper's Table II)", **metrics}
        storage.put_bytes(args.json, json.dumps(report, indent=2).encode())
        print(f"  wrote {args.json}")
    return 0


def _samples_name(args: argparse.Namespace) -> str:
    return args.coco or args.data


def describe_set(metrics: Mapping[str, Any]) -> str:
    boxes = metrics["boxes"]
    return f"{metrics['images']} images, {sum(boxes.values())} boxes (" + ", ".join(f"{k} {v}" for k, v in boxes.items()) + ")"


def format_table(rows: Sequence[tuple[str, Mapping[str, Any]]], first_column: str) -> str:
    """Rows in the layout of the paper's Table II: mAP, mAP.5, mAP.75, then AP per class (percent)."""
    classes = list(rows[0][1]["AP"])
    width = max(len(first_column), *(len(name) for name, _ in rows))
    columns = [*SUMMARY_METRICS, *classes]
    cell = max(7, *(len(c) + 1 for c in columns))

    def number(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.1f}':>{cell}}"

    lines = [
        f"{'':{width}}{'':>{cell * len(SUMMARY_METRICS)}}  {'AP':>{cell}}",
        f"{first_column:{width}}" + "".join(f"{c:>{cell}}" for c in SUMMARY_METRICS) + "  "
        + "".join(f"{c:>{cell}}" for c in classes),
    ]
    for name, metrics in rows:
        lines.append(f"{name:{width}}" + "".join(number(metrics[c]) for c in SUMMARY_METRICS) + "  "
                     + "".join(number(metrics["AP"][c]) for c in classes))
    return "\n".join(lines)
