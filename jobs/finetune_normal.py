"""`cytosynth finetune-normal`: train the Normal Image Generator's LoRA on your normal tiles."""

from __future__ import annotations

import argparse

from cytosynth.cluster.finetune_normal import NormalLoraTask
from cytosynth.cluster.training import train
from cytosynth.synth import PRESETS

from .train_options import absolute, add_train_arguments, print_summary, train_config


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("finetune-normal", help="train the stage-1 LoRA (SD1.5 attn2 q/k/v/out) on normal tiles")
    parser.add_argument("--data", required=True, help="normal tiles: a folder of images, shards, or s3://...")
    parser.add_argument("--model-dir", help="base model: a diffusers SD1.5 folder or URL (default: --preset random weights)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture when no --model-dir")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels; other sizes are refused")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (paper: 8)")
    parser.add_argument("--sample-count", type=int, default=4, help="tiles in each samples/ grid")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sample tiles")
    add_train_arguments(parser, steps=5000, batch_size=1, lr=1e-4, optimizer="adam")
    parser.set_defaults(run=finetune_normal)


def finetune_normal(args: argparse.Namespace) -> int:
    task = NormalLoraTask(
        data=absolute(args.data),
        model_dir=absolute(args.model_dir),
        preset=args.preset,
        tile_size=args.tile_size,
        rank=args.rank,
        sample_count=args.sample_count,
        sample_steps=args.sample_steps,
    )
    print_summary(train(train_config(args), task))
    return 0
