"""`cytosynth train-detector`: Faster R-CNN or RetinaNet on real and synthetic shards, mixed at a ratio."""

from __future__ import annotations

import argparse
from typing import Any

from cytosynth.training.train_config import DEFAULT_LR, NUM_CLASSES, PAPER_EPOCHS, DetectorTrainConfig

from .options import field_defaults
from .train_options import add_train_arguments, print_summary, train_config

DEFAULTS = field_defaults(DetectorTrainConfig)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train-detector", help="train a Faster R-CNN or RetinaNet cell detector (nilm) or "
                                 "abnormal-cell detector")
    parser.add_argument("--real", help="real shards: a job output, .tar, brace pattern or glob (local or s3://)")
    parser.add_argument("--synthetic", help="synthetic shards, e.g. a `cytosynth generate` output")
    parser.add_argument("--synthetic-fraction", type=float, default=DEFAULTS.synthetic_fraction, help="share of synthetic samples per epoch, 0-1")
    parser.add_argument("--labels", choices=sorted(NUM_CLASSES), default=DEFAULTS.labels,
                        help="abnormal: ASC-US/ASC-H/LSIL/HSIL; nilm: every cell, the detector generate --detector uses")
    parser.add_argument("--arch", default=DEFAULTS.arch, help="fasterrcnn (default) or retinanet: torchvision's "
                        "*_resnet50_fpn (DINO, the paper's third detector, is not in torchvision)")
    parser.add_argument("--backbone-weights", metavar="FILE", help="torchvision ResNet-50 ImageNet weights as a "
                        "safetensors state dict (path or URL every worker can read; never downloaded): frozen "
                        "BatchNorm, conv1 and layer1 frozen, as torchvision trains on a pretrained backbone. "
                        "Without it: from scratch, BatchNorm, every layer trained")
    parser.add_argument("--epochs", type=float, help=f"passes over the real set; sets the steps from the shard stats "
                        f"(default {PAPER_EPOCHS}, the paper's, unless --steps is given)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS.image_size, help="side the detector resizes images to")
    parser.add_argument("--roi-samples", type=int, default=DEFAULTS.roi_samples, help="Faster R-CNN: proposals "
                        "per image its box head trains on (torchvision's 512, for COCO's many objects; a few "
                        "cells per tile need fewer, and the box head is half a step's time on a CPU)")
    parser.add_argument("--loader-workers", type=int, default=DEFAULTS.loader_workers, help="data loading processes per training worker")
    # The paper's Table II: SGD, batch 2, 20 epochs (DetectorTrainConfig's defaults); lr per
    # detector (DEFAULT_LR) unless --lr is given.
    lrs = ", ".join(f"{arch} {lr:g}" for arch, lr in DEFAULT_LR.items())
    add_train_arguments(parser, {"steps": "optimizer steps, instead of --epochs",
                                 "lr": f"learning rate (default: the paper's, {lrs})"}, DetectorTrainConfig)
    parser.set_defaults(run=run_train_detector)


def detector_config(args: argparse.Namespace) -> DetectorTrainConfig:
    return train_config(args, DetectorTrainConfig, paths=("real", "synthetic", "backbone_weights"))


def run_train_detector(args: argparse.Namespace) -> int:
    train(detector_config(args))
    return 0


def train(config: DetectorTrainConfig) -> dict[str, Any]:
    """The train-detector job (augmentation-study runs it once per arm): its summary, printed."""
    from cytosynth.cluster.ray_train import train as train_on_ray
    from cytosynth.training.detector_task import detector_task  # torch

    summary = train_on_ray(config, detector_task(config))
    print_summary(summary)
    return summary
