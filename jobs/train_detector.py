"""`cytosynth train-detector`: Faster R-CNN or RetinaNet on real and synthetic shards, mixed at a ratio."""

from __future__ import annotations

import argparse

from cytosynth.cluster.train_config import DEFAULT_LR, NUM_CLASSES, PAPER_EPOCHS

from .train_options import absolute, add_train_arguments, print_summary, uses_gpu


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train-detector", help="train a Faster R-CNN or RetinaNet cell detector (nilm) or "
                                 "abnormal-cell detector")
    parser.add_argument("--real", help="real shards: a job output, .tar, brace pattern or glob (local or s3://)")
    parser.add_argument("--synthetic", help="synthetic shards, e.g. a `cytosynth generate` output")
    parser.add_argument("--synthetic-fraction", type=float, default=0.0, help="share of synthetic samples per epoch, 0-1")
    parser.add_argument("--labels", choices=sorted(NUM_CLASSES), default="abnormal",
                        help="abnormal: ASC-US/ASC-H/LSIL/HSIL; nilm: every cell, the detector generate --detector uses")
    parser.add_argument("--arch", default="fasterrcnn", help="fasterrcnn (default) or retinanet: torchvision's "
                        "*_resnet50_fpn (DINO, the paper's third detector, is not in torchvision)")
    parser.add_argument("--backbone-weights", metavar="FILE", help="torchvision ResNet-50 ImageNet weights as a "
                        "safetensors state dict (path or URL every worker can read; never downloaded): frozen "
                        "BatchNorm, conv1 and layer1 frozen, as torchvision trains on a pretrained backbone. "
                        "Without it: from scratch, BatchNorm, every layer trained")
    parser.add_argument("--epochs", type=float, help=f"passes over the real set; sets the steps from the shard stats "
                        f"(default {PAPER_EPOCHS}, the paper's, unless --steps is given)")
    parser.add_argument("--image-size", type=int, default=1024, help="side the detector resizes images to")
    parser.add_argument("--loader-workers", type=int, default=2, help="data loading processes per training worker")
    # The paper's Table II: SGD, batch 2, 20 epochs; lr per detector (DEFAULT_LR) unless --lr is given.
    lrs = ", ".join(f"{arch} {lr:g}" for arch, lr in DEFAULT_LR.items())
    add_train_arguments(parser, {"steps": "optimizer steps, instead of --epochs",
                                 "lr": f"learning rate (default: the paper's, {lrs})"},
                        steps=None, batch_size=2, lr=None, optimizer="sgd", weight_decay=1e-4, max_grad_norm=0.0)
    parser.set_defaults(run=run_train_detector)


def run_train_detector(args: argparse.Namespace) -> int:
    from cytosynth.cluster.train_detector import DetectorTrainConfig, train_detector  # torch

    config = DetectorTrainConfig(
        out=absolute(args.out),
        real=absolute(args.real),
        synthetic=absolute(args.synthetic),
        synthetic_fraction=args.synthetic_fraction,
        labels=args.labels,
        arch=args.arch,
        backbone_weights=absolute(args.backbone_weights),
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        workers=args.workers,
        use_gpu=uses_gpu(args),
        zero_stage=args.zero_stage,
        image_size=args.image_size,
        loader_workers=args.loader_workers,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        log_every=args.log_every,
        seed=args.seed,
        resume=not args.no_resume,
        ray_address=args.ray_address,
        progress=not args.quiet,
    )
    print_summary(train_detector(config))
    return 0
