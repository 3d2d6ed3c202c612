"""`cytosynth generate` (synthesize a dataset) and `cytosynth preview` (draw its contact sheet)."""

from __future__ import annotations

import argparse

from cytosynth import storage
from cytosynth.cluster.runner import Runtime, run_local
from cytosynth.cluster.worker import NORMAL_SOURCES, GenerateConfig
from cytosynth.synth import ABNORMAL_CLASSES, PRESETS, InvalidInputError

from .common import default_device


def _cells(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX like 1-8, got {text!r}") from None


def _class_weights(text: str) -> dict[str, float]:
    """"ASC-US=1,HSIL=2" -> {"ASC-US": 1.0, "HSIL": 2.0}."""
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in ABNORMAL_CLASSES:
            raise argparse.ArgumentTypeError(f"unknown class {name!r}; choose from {', '.join(ABNORMAL_CLASSES)}")
        try:
            weights[name] = float(value or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {item!r}") from None
    return weights


def register(commands: argparse._SubParsersAction) -> None:

    gen = commands.add_parser("generate", help="synthesize annotated tiles into WebDataset shards")
    gen.add_argument("--out", required=True, help="output URL: a folder, s3://bucket/prefix or memory://...")
    gen.add_argument("--num-tiles", type=int, help="tiles to generate (default with --normal-source real: all)")
    gen.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    gen.add_argument("--model-dir", help="model bundle folder or URL (SD1.5 diffusers folder + normal_lora/ + acs_unet/)")
    gen.add_argument("--random-weights", action="store_true", help="sd15 with random weights (benchmarks)")
    gen.add_argument("--lora", help="normal LoRA safetensors (default: <model-dir>/normal_lora/)")
    gen.add_argument("--acs-unet", help="Abnormal Cell Synthesizer UNet folder (default: <model-dir>/acs_unet/)")
    gen.add_argument("--detector", help="Faster R-CNN state dict (safetensors); default: the classical detector")
    gen.add_argument("--normal-source", choices=NORMAL_SOURCES, default="diffusion")
    gen.add_argument("--real-tiles", help="folder or shards of real normal tiles (--normal-source real)")
    gen.add_argument("--cells", type=_cells, default=(1, 8), help="abnormal cells per tile, MIN-MAX (default 1-8)")
    gen.add_argument("--class-weights", type=_class_weights, help="e.g. ASC-US=1,HSIL=3 (default: uniform)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tiles-per-shard", type=int, default=64)
    gen.add_argument("--plan", help="JSON plan of cells per tile (see README)")
    gen.add_argument("--image-format", choices=storage.IMAGE_FORMATS, default="png")
    gen.add_argument("--tile-size", type=int, default=1024)
    gen.add_argument("--steps", type=int, default=25, help="DDIM steps (paper: 25)")
    gen.add_argument("--guidance", type=float, default=5.0, help="CFG scale (paper: 5.0)")
    gen.add_argument("--device", default=default_device())
    gen.add_argument("--batch-size", type=int, default=4, help="tiles per model call")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--workers", type=int, default=0, help="0: run in this process; W >= 1: W Ray replicas")
    gen.add_argument("--ray-address", help="an existing Ray cluster (host:port, ray://host:port or auto)")
    gen.add_argument("--gpus-per-replica", type=float, help="GPUs per Ray replica, may be fractional "
                     "(default: 1 with a CUDA --device, else 0: one CPU per replica)")

    prev = commands.add_parser("preview", help="draw the contact sheet of a dataset (writes preview.png)")
    prev.add_argument("url", help="dataset URL (a generate --out)")
    prev.add_argument("--max-tiles", type=int, default=16)
    gen.set_defaults(run=generate)
    prev.set_defaults(run=preview)


def _read_plan(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as err:
        raise InvalidInputError(f"cannot read plan {path}: {err.strerror}") from None


def generate(args: argparse.Namespace) -> int:
    config = GenerateConfig(
        out=args.out,
        num_tiles=args.num_tiles,
        preset=args.preset,
        model_dir=args.model_dir,
        random_weights=args.random_weights,
        lora=args.lora,
        acs_unet=args.acs_unet,
        detector=args.detector,
        normal_source=args.normal_source,
        real_tiles=args.real_tiles,
        cells=args.cells,
        class_weights=args.class_weights,
        seed=args.seed,
        tiles_per_shard=args.tiles_per_shard,
        plan=_read_plan(args.plan),
        image_format=args.image_format,
        tile_size=args.tile_size,
        steps=args.steps,
        guidance=args.guidance,
    )
    runtime = Runtime(args.device, args.batch_size, progress=not args.quiet)
    if args.workers or args.ray_address:
        from cytosynth.cluster.distributed import run_distributed  # Ray only when asked for

        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if args.device.startswith("cuda") else 0.0
        summary = run_distributed(config, runtime, max(args.workers, 1), args.ray_address, gpus)
    else:
        summary = run_local(config, runtime)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    rate = summary["tiles"] / summary["seconds"] if summary["seconds"] else float("nan")
    lines = [
        f"cytosynth: wrote {summary['tiles']} tiles in {summary['shards']} shards to {summary['out']}",
        f"  time       {summary['seconds']:.1f} s ({rate:.2f} tiles/s)",
        f"  abnormal   {sum(summary['cells'].values())} cells: "
        + ", ".join(f"{name} {count}" for name, count in summary["cells"].items()),
        f"  normal     {summary['normal_cells']} NILM cells annotated",
        "  files      job.json, shards/*.tar, manifest.parquet, preview.png, _SUCCESS",
    ]
    return "\n".join(lines)


def preview(args: argparse.Namespace) -> int:
    url = storage.write_preview(args.url, max_tiles=args.max_tiles)
    print(f"cytosynth: wrote {url}")
    return 0
