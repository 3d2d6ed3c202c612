"""`cytosynth eval-detector` (COCO AP of a detector, the paper's Table II) and
`cytosynth augmentation-study` (real vs real + synthetic training, scored on one held-out set)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cytosynth import storage, synth
from cytosynth.synth import InvalidInputError
from cytosynth.synth.errors import named_as_urls

from . import train_detector
from .options import absolute

LABEL_SETS = ("abnormal", "nilm")  # storage.LABEL_SETS, spelled out: it would import torch at CLI start
STUDY_JSON, STUDY_CHART = "augmentation_study.json", "augmentation_study.png"
ARCH_NAMES = {"fasterrcnn": "Faster R-CNN", "retinanet": "RetinaNet"}  # as Table II names them


@dataclass(frozen=True)
class EvalSet:
    """A labelled set to score on: shards (``data``) or a COCO JSON (``coco``) with its image folder."""

    data: str | None = None
    coco: str | None = None
    images: str | None = None
    labels: str = "abnormal"

    @property
    def name(self) -> str:
        return self.coco or self.data or ""

    def samples(self) -> tuple[Iterator[Any], int | None]:
        """(detection inputs, their count if known); a missing set fails here, before any work."""
        if self.coco:
            return storage.coco_detection_samples(self.coco, self.images, self.labels), None
        if self.images:
            raise InvalidInputError("an image folder goes with a COCO file, not with shards")
        shards = storage.resolve_shards(self.data)
        return storage.shard_detection_samples(shards, self.labels), storage.count_samples(shards)


@contextlib.contextmanager
def local_file(url: str) -> Iterator[str]:
    """A local path holding ``url``'s bytes: the path itself, or a temporary download (``s3://``...)."""
    if "://" not in url or url.startswith("file://"):
        yield url.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1])
        with open(path, "wb") as fh:
            fh.write(storage.get_bytes(url))
        with named_as_urls({path: url}):  # an error about the copy names the user's URL
            yield path


def evaluate(detector: str, test_set: EvalSet, *, image_size: int, device: str | None, batch_size: int,
             progress: bool) -> dict[str, Any]:
    """Table II metrics of a detector file (path or URL) on ``test_set``, on ``device`` (None: cuda
    where available)."""
    from cytosynth.synth.detection_metrics import evaluate_detector, load_detection_model, object_classes  # torch

    device = device or synth.default_device()
    categories = storage.detection_categories(test_set.labels)
    samples, total = test_set.samples()
    with local_file(detector) as path:
        model = load_detection_model(path, device, min_size=image_size, max_size=image_size)
    if object_classes(model) != len(categories):
        raise InvalidInputError(
            f"detector {detector} predicts {object_classes(model)} object classes but --labels {test_set.labels} "
            f"scores {len(categories)} ({', '.join(categories.values())})"
        )
    return evaluate_detector(model, samples, categories, device=device, batch_size=batch_size,
                             progress=progress, total=total)


# --------------------------------------------------------------------------- eval-detector


def register(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser("eval-detector", help="COCO AP of a Faster R-CNN or RetinaNet detector on a labelled set "
                             "(Table II)")
    ev.add_argument("--detector", required=True, help="a train-detector file (safetensors, path or URL); its "
                    "architecture and class count are read from it")
    data = ev.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="labelled shards: a job output, .tar, brace pattern or glob (or s3://)")
    data.add_argument("--coco", help="a COCO detection JSON (categories matched by name)")
    ev.add_argument("--images", help="image folder of --coco (default: the JSON's folder)")
    ev.add_argument("--labels", choices=LABEL_SETS, default="abnormal",
                    help="abnormal: ASC-US, ASC-H, LSIL, HSIL; nilm: every cell as one class")
    ev.add_argument("--image-size", type=int, default=1024, help="side the detector resizes images to, as in "
                    "train-detector (default 1024)")
    ev.add_argument("--device", help="torch device (default: cuda where available, else cpu)")
    ev.add_argument("--batch-size", type=int, default=4, help="images per detector call")
    ev.add_argument("--json", help="also write the metrics here as JSON (a path or URL)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=eval_detector)
    _register_study(commands)


def eval_detector(args: argparse.Namespace) -> int:
    test_set = EvalSet(args.data, args.coco, args.images, args.labels)
    metrics = evaluate(args.detector, test_set, image_size=args.image_size, device=args.device,
                       batch_size=args.batch_size, progress=not args.quiet)
    print(f"cytosynth eval-detector: {describe_set(metrics)} from {test_set.name}")
    print(format_table([(os.path.basename(args.detector), metrics)], "Detector"))
    if args.json:
        report = {"detector": args.detector, "data": test_set.name, "labels": args.labels,
                  "units": "AP x 100 (the paper's Table II)", **metrics}
        storage.put_bytes(args.json, json.dumps(report, indent=2).encode())
        print(f"  wrote {args.json}")
    return 0


def describe_set(metrics: Mapping[str, Any]) -> str:
    boxes = metrics["boxes"]
    per_class = ", ".join(f"{name} {count}" for name, count in boxes.items())
    return f"{metrics['images']} images, {sum(boxes.values())} boxes ({per_class})"


def format_table(rows: Sequence[tuple[str, Mapping[str, Any]]], first_column: str) -> str:
    """Rows in the layout of the paper's Table II: mAP, mAP.5, mAP.75, then AP per class (percent)."""
    from cytosynth.synth.detection_metrics import SUMMARY_METRICS  # torch

    classes = list(rows[0][1]["AP"])
    width = max(len(first_column), *(len(name) for name, _ in rows)) + 2
    cell = max(7, *(len(c) + 2 for c in classes))

    def number(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.1f}':>{cell}}"

    def line(name: str, summary: Sequence[str], per_class: Sequence[str]) -> str:
        return f"{name:<{width}}" + "".join(summary) + "  |" + "".join(per_class)

    return "\n".join([
        line("", [f"{'':>{cell}}"] * len(SUMMARY_METRICS), [f"{'AP':>{cell}}"]),
        line(first_column, [f"{m:>{cell}}" for m in SUMMARY_METRICS], [f"{c:>{cell}}" for c in classes]),
        *(line(name, [number(m[s]) for s in SUMMARY_METRICS], [number(m["AP"][c]) for c in classes])
          for name, m in rows),
    ])


# --------------------------------------------------------------------------- augmentation-study


def _train_detector_parser() -> argparse.ArgumentParser:
    """train-detector's own parser: the study takes exactly its options and hands them on to it."""
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    train_detector.register(scratch)
    return scratch.choices["train-detector"]


def _register_study(commands: argparse._SubParsersAction) -> None:
    study = commands.add_parser(
        "augmentation-study", parents=[_train_detector_parser()], conflict_handler="resolve",
        help="train a detector on real and on real + synthetic data (train-detector), score both on one held-out set",
    )
    study.add_argument("--out", required=True, help="output URL: real/ and real+synthetic/ (two train-detector "
                       f"outputs), {STUDY_JSON}, {STUDY_CHART}")
    held_out = study.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--test", help="held-out labelled shards (a job output, .tar, brace pattern, glob, s3://)")
    held_out.add_argument("--test-coco", help="held-out set as a COCO detection JSON")
    study.add_argument("--test-images", help="image folder of --test-coco (default: the JSON's folder)")
    study.set_defaults(run=augmentation_study)


def study_arms(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(folder, Table II "Training data" label, train-detector overrides) of the two arms."""
    f = args.synthetic_fraction
    real = storage.count_samples(storage.resolve_shards(args.real))
    if real is None:  # shards without stats: say what was mixed instead of how much
        labels = ("R", f"R + S ({f:.0%} of samples)")
    else:  # the synthetic share is drawn beside each real epoch (storage.loader)
        labels = (f"R: {real:,}", f"R: {real:,} + S: {round(real * f / (1 - f)):,}")
    return [
        ("real", labels[0], {"synthetic": None, "synthetic_fraction": 0.0}),
        ("real+synthetic", labels[1], {}),
    ]


def augmentation_study(args: argparse.Namespace) -> int:
    if not (args.real and args.synthetic):
        raise InvalidInputError("augmentation-study needs --real and --synthetic shards")
    if not 0 < args.synthetic_fraction < 1:
        raise InvalidInputError(f"--synthetic-fraction must be strictly between 0 and 1, got {args.synthetic_fraction}")
    config = train_detector.detector_config(args)
    test_set = EvalSet(args.test, args.test_coco, args.test_images, args.labels)
    test_set.samples()  # a missing held-out set fails now, not after two trainings
    rows, report = [], []
    for folder, label, overrides in study_arms(args):
        # The train-detector job itself, with this arm's data: same model, optimizer and steps.
        arm = replace(config, out=absolute(storage.join(args.out, folder)), **overrides)
        artifact = train_detector.train(arm)["artifact"]
        metrics = evaluate(artifact, test_set, image_size=args.image_size, device=args.device,
                           batch_size=args.batch_size, progress=not args.quiet)
        rows.append((label, metrics))
        report.append({"arm": folder, "training_data": label, "detector": artifact, **metrics})
    print(f"cytosynth augmentation-study: {ARCH_NAMES[args.arch]}, held-out {describe_set(rows[0][1])} "
          f"from {test_set.name}")
    print(format_table(rows, "Training data"))
    summary = {"arch": args.arch, "labels": args.labels, "synthetic_fraction": args.synthetic_fraction,
               "test": test_set.name,
               "units": "AP x 100 (the paper's Table II)", "rows": report}
    storage.put_bytes(storage.join(args.out, STUDY_JSON), json.dumps(summary, indent=2).encode())
    storage.put_bytes(storage.join(args.out, STUDY_CHART), ap_bar_chart(rows))
    print(f"  wrote {STUDY_JSON} and {STUDY_CHART} under {args.out}")
    return 0


def ap_bar_chart(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> bytes:
    """PNG of grouped bars: mAP, then AP per class, one bar per training-data row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = ["mAP", *rows[0][1]["AP"]]
    figure = Figure(figsize=(7.5, 3.6), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    axes = figure.subplots()
    width = 0.8 / len(rows)
    for i, (label, metrics) in enumerate(rows):
        values = [metrics["mAP"], *metrics["AP"].values()]
        heights = [math.nan if v is None else v for v in values]  # no ground truth: no bar
        offsets = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(offsets, heights, width, label=label)
        axes.bar_label(bars, ["" if v is None else f"{v:.1f}" for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("AP (%), IoU 0.50:0.95")
    axes.set_title("Detector AP per class: real vs real + synthetic training")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
