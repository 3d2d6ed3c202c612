"""`cytosynth train-detector`: Faster R-CNN on real and synthetic shards, mixed at a ratio."""

from __future__ import annotations

import argparse

from cytosynth.cluster.train_detector import NUM_CLASSES, DetectorTrainConfig, train_detector

from .train_options import absolute, add_train_arguments, print_summary


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train-detector", help="train a Faster R-CNN cell detector (nilm) or abnormal-cell detector")
    parser.add_argument("--real", help="real shards: a job output, .tar, brace pattern or glob (local or s3://)")
    parser.add_argument("--synthetic", help="synthetic shards, e.g. a `cytosynth generate` output")
    parser.add_argument("--synthetic-fraction", type=float, default=0.0, help="share of synthetic samples per epoch, 0-1")
    parser.add_argument("--labels", choices=sorted(NUM_CLASSES), default="abnormal",
                        help="abnormal: ASC-US/ASC-H/LSIL/HSIL; nilm: every cell, the detector generate --detector uses")
    parser.add_argument("--epochs", type=float, help="passes over the real set; sets --steps from the shard stats")
    parser.add_argument("--image-size", type=int, default=1024, help="side the detector resizes images to")
    parser.add_argument("--loader-workers", type=int, default=2, help="data loading processes per training worker")
    # The paper's Faster R-CNN: SGD, lr 2e-4, batch 2.
    add_train_arguments(parser, steps=1000, batch_size=2, lr=2e-4, optimizer="sgd", weight_decay=1e-4, max_grad_norm=0.0)
    parser.set_defaults(run=run_train_detector)


def run_train_detector(args: argparse.Namespace) -> int:
    config = DetectorTrainConfig(
        out=absolute(args.out),
        real=absolute(args.real),
        synthetic=absolute(args.synthetic),
        synthetic_fraction=args.synthetic_fraction,
        labels=args.labels,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        workers=args.workers,
        use_gpu=args.device == "cuda",
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
