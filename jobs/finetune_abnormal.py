"""`cytosynth finetune-abnormal`: train the Abnormal Cell Synthesizer on annotated abnormal cells."""

from __future__ import annotations

import argparse

from cytosynth.synth import PRESETS
from cytosynth.synth.cell_selection import BOX_SIZES
from cytosynth.synth.cfg_dropout import GROUNDING_DROPOUT, PROMPT_DROPOUT

from .options import from_args
from .train_options import add_train_arguments, note_random_base, print_summary, train_config


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune-abnormal", help="train the stage-2 Abnormal Cell Synthesizer (GLIGEN inpainting UNet) on abnormal cells"
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="tiles with abnormal boxes: cytosynth shards (a job output, .tar, pattern), or s3://...")
    data.add_argument("--coco", help="tiles with abnormal boxes: a COCO detection JSON (categories ASC-US, ASC-H, LSIL, HSIL)")
    parser.add_argument("--images", help="image folder of --coco (default: the JSON's folder)")
    parser.add_argument("--model-dir", help="base model: a diffusers SD1.5 folder or URL (default: --preset random weights)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture when no --model-dir")
    parser.add_argument("--shuffle-buffer", type=int, default=64, help="crops per worker mixed before batching")
    parser.add_argument("--sample-count", type=int, default=4, help="crops in each samples/ grid (a row each)")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sample edits")
    parser.add_argument(
        "--prompt-dropout", type=float, default=PROMPT_DROPOUT,
        help=f"share of crops trained with the empty prompt, for CFG (default {PROMPT_DROPOUT}, GLIGEN's)",
    )
    parser.add_argument(
        "--grounding-dropout", type=float, default=GROUNDING_DROPOUT,
        help=f"share of crops trained without the grounding token, for CFG (default {GROUNDING_DROPOUT}, GLIGEN's)",
    )
    parser.add_argument(
        "--box-size", choices=BOX_SIZES, default=BOX_SIZES[0],
        help="the box each training crop is grounded on and painted in: 'cell', the abnormal cell's own (the paper); "
        "'normal', grown to a normal cell's of the same tile (shards' normal_boxes, COCO NILM boxes), as generate's boxes are",
    )
    # The paper: AdamW, lr 1e-4, batch 4, 50k iterations. It does not state the weight decay;
    # GLIGEN's trainer, which it follows, uses 0 (the harness default).
    add_train_arguments(parser, steps=50000, batch_size=4, lr=1e-4, optimizer="adamw")
    parser.set_defaults(run=finetune_abnormal)


def finetune_abnormal(args: argparse.Namespace) -> int:
    from cytosynth.training.abnormal_cells import AbnormalCellTask  # torch, diffusers
    from cytosynth.cluster.ray_train import train

    task = from_args(AbnormalCellTask, args, paths=("data", "coco", "images", "model_dir"))
    summary = train(train_config(args), task)
    print_summary(summary)
    note_random_base(args)
    print("  crops      " + ", ".join(f"{name} {n}" for name, n in task.crop_counts().items()))
    return 0
