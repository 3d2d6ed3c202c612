"""Command-line options every training job shares, and the harness config they make."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from cytosynth import synth
from cytosynth.training.train_config import OPTIMIZERS, PRECISIONS, TrainConfig

from .options import field_defaults, from_args

C = TypeVar("C", bound=TrainConfig)


def add_train_arguments(
    parser: argparse.ArgumentParser, helps: Mapping[str, str] | None = None, config: type[TrainConfig] = TrainConfig,
    **defaults: Any,
) -> None:
    """--out, --steps, --batch-size, ... on `parser`, with the defaults of `config` (TrainConfig, or
    a job's own subclass) or a job's own `defaults` (e.g. lr=2e-4); `helps` its own help texts
    (e.g. {"steps": ...} for a job whose default is not a step count)."""
    helps = helps or {}
    d = {**vars(field_defaults(config)), **defaults}
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, help="output URL: the artifact, job.json, metrics.jsonl, checkpoints/, samples/")
    steps_help = helps.get("steps", f"optimizer steps (default {d['steps']})")
    group.add_argument("--steps", type=int, default=d["steps"], help=steps_help)
    group.add_argument("--batch-size", type=int, default=d["batch_size"], help="samples per worker per step")
    group.add_argument("--lr", type=float, default=d["lr"], help=helps.get("lr", "learning rate"))
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"], help="torch optimizer (the paper's per job by default)")
    group.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="the optimizer's weight decay")
    group.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help="gradient clipping, 0: none")
    group.add_argument("--workers", type=int, default=d["workers"], help="training ranks, one GPU each with cuda: Ray Train workers (1 without --ray-address: this process, no Ray)")
    group.add_argument("--device", choices=("cuda", "cpu"), help="cuda: NCCL on GPUs; cpu: gloo (default: cuda where available)")
    group.add_argument(
        "--precision", choices=PRECISIONS, default=d["precision"],
        help="auto: bf16 on cuda, fp32 on cpu (detectors always train in fp32)",
    )
    group.add_argument("--zero-stage", type=int, default=d["zero_stage"], help="DeepSpeed ZeRO stage (0: plain data parallel)")
    group.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], metavar="N",
                       help="write checkpoints/step_NNNNNN/ every N steps (a re-run resumes from the last complete one)")
    group.add_argument("--sample-every", type=int, default=d["sample_every"], help="write samples/step_NNNNNN.png this often")
    group.add_argument("--log-every", type=int, default=d["log_every"], help="rewrite metrics.jsonl this often")
    group.add_argument("--seed", type=int, default=d["seed"], help="seeds initialisation, data order and noise")
    group.add_argument("--no-resume", action="store_true", help="refuse to continue from a checkpoint in --out")
    group.add_argument("--ray-address", help="an existing Ray cluster (default: a local one)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def uses_gpu(args: argparse.Namespace) -> bool:
    """--device cuda, or no --device on a machine with CUDA (the default, decided only when a job runs)."""
    return (args.device or synth.default_device()) == "cuda"


def train_config(args: argparse.Namespace, config: type[C] = TrainConfig, paths: Iterable[str] = ()) -> C:
    """The harness config (or `config`, a TrainConfig with a job's own fields and `paths`) from the options."""
    return from_args(config, args, paths=("out", *paths), use_gpu=uses_gpu(args))


def note_random_base(args: argparse.Namespace) -> None:
    """Without --model-dir a fine-tuning job trains random weights: fine for a smoke test, useless
    for real tiles, so its summary says so rather than look like a real run (after the run, so that
    bad input stays one error line)."""
    if not args.model_dir:
        print(f"  note       no --model-dir: trained the random-init {args.preset} preset, a smoke test; "
              "for real tiles give --model-dir with a diffusers SD1.5 folder")


def print_summary(summary: dict[str, Any]) -> None:
    print(f"cytosynth: {summary['job']} finished {summary['steps']} steps on {summary['workers']} workers, "
          f"final loss {summary['final_loss']:.4f}")
    print(f"  output     {summary['artifact']}")
    print(f"  also       job.json, metrics.jsonl, samples/, checkpoints/ under {summary['out']}")
