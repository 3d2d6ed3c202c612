"""`cytosynth finetune-normal`: train the Normal Image Generator's LoRA on your normal tiles."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cytosynth.training.train_config import SELECT_BY
from cytosynth.synth import PRESETS, InvalidInputError

from .options import absolute, from_args
from .train_options import add_train_arguments, note_random_base, print_summary, train_config

if TYPE_CHECKING:
    from cytosynth.training.model_selection import FidSelection


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("finetune-normal", help="train the stage-1 LoRA (SD1.5 attn2 q/k/v/out) on normal tiles")
    parser.add_argument("--data", required=True, help="normal tiles: a folder of images, shards, or s3://...")
    parser.add_argument("--model-dir", help="base model: a diffusers SD1.5 folder or URL (default: --preset random weights)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture when no --model-dir")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels; other sizes are refused")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (paper: 8)")
    parser.add_argument("--sample-count", type=int, default=4, help="tiles in each samples/ grid")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sample tiles")
    select = parser.add_argument_group("model selection (paper: \"the best model is selected\")")
    select.add_argument("--select-by", choices=SELECT_BY,
                        help="score every checkpoint and the final step; the artifact is the best one, not the last")
    select.add_argument("--select-real", help="held-out real tiles to score against: a folder of images or shards, or s3://...")
    select.add_argument("--select-feature-extractor", metavar="FILE",
                        help="TorchScript or torch.export (.pt2) extractor, as `cytosynth fid --feature-extractor`")
    select.add_argument("--select-count", type=int, default=16, help="tiles drawn (fixed seeds) per scored step")
    add_train_arguments(parser, steps=5000, batch_size=1, lr=1e-4, optimizer="adam")
    parser.set_defaults(run=finetune_normal)


def finetune_normal(args: argparse.Namespace) -> int:
    from cytosynth.training.normal_lora import NormalLoraTask  # torch, diffusers
    from cytosynth.cluster.ray_train import train

    task = from_args(NormalLoraTask, args, paths=("data", "model_dir"), selection=_selection(args))
    summary = train(train_config(args), task)
    print_summary(summary)
    note_random_base(args)
    if "best_step" in summary:
        print(f"  selected   step {summary['best_step']}, FID {summary['best_fid']} (every score: {summary['selection']})")
    return 0


def _selection(args: argparse.Namespace) -> FidSelection | None:
    """--select-* options; they are checked with the rest of the task (NormalLoraTask.validate)."""
    if args.select_by is None:
        if args.select_real or args.select_feature_extractor:
            raise InvalidInputError("--select-real and --select-feature-extractor need --select-by fid")
        return None
    from cytosynth.training.model_selection import FidSelection  # torch

    return FidSelection(absolute(args.select_real), absolute(args.select_feature_extractor), args.select_count, args.select_by)
