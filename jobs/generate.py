"""`cytosynth generate` (synthesize a dataset) and `cytosynth preview` (draw its contact sheet)."""

from __future__ import annotations

import argparse

from cytosynth import storage
from cytosynth.cluster.failures import REPLICA_TIMEOUT
from cytosynth.generation.generate_config import NORMAL_SOURCES, GenerateConfig
from cytosynth.synth.settings import ANNOTATED_BOXES, EMPTY_EDITS, PRECISIONS, SynthesisSettings
from cytosynth.generation.runner import LocalExecutor, Runtime, ShardExecutor, run_job
from cytosynth.generation.shard_maker import IDLE_STAGES, STAGES
from cytosynth.synth import ABNORMAL_CLASSES, PRESETS, InvalidInputError

from .common import has_cuda_device
from .options import field_defaults, from_args

CONFIG, SETTINGS, RUNTIME = field_defaults(GenerateConfig), field_defaults(SynthesisSettings), field_defaults(Runtime)  # the options' defaults


def _cells(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX like 1-8, got {text!r}") from None


def _workers(text: str) -> tuple[int, int]:
    """"8" -> (8, 8); "0-16" -> (0, 16): a pool of 0 to 16 replicas (0: in this process)."""
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W or MIN-MAX like 0-16, got {text!r}") from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return low, high


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
    gen.add_argument("--preset", choices=sorted(PRESETS), default=CONFIG.preset, help="model architecture: tiny (random-init miniature built in code, for tests), mini (the shipped "
                     "miniature bundle models/mini, needs --model-dir) or sd15 (needs --model-dir, or --random-weights)")
    gen.add_argument("--model-dir", help="model bundle folder or URL (SD1.5 diffusers folder + normal_lora/ + acs_unet/)")
    gen.add_argument("--random-weights", action="store_true", help="the --preset architecture with random weights, no --model-dir (benchmarks: costs what real weights cost)")
    gen.add_argument("--lora", help="normal LoRA safetensors (default: <model-dir>/normal_lora/)")
    gen.add_argument("--acs-unet", help="Abnormal Cell Synthesizer UNet folder (default: <model-dir>/acs_unet/)")
    gen.add_argument("--detector", help="Faster R-CNN state dict (safetensors); default: the classical detector")
    gen.add_argument("--normal-source", choices=NORMAL_SOURCES, default=CONFIG.normal_source, help="where the normal tiles come from: diffusion (stage 1), phantom (drawn Pap-like tiles, demos), real (--real-tiles, real-to-synthetic)")
    gen.add_argument("--real-tiles", help="folder or shards of real normal tiles (--normal-source real)")
    gen.add_argument("--cells", type=_cells, default=SETTINGS.cells, help="abnormal cells per tile, MIN-MAX (default 1-8)")
    gen.add_argument("--class-weights", type=_class_weights, help="relative class frequencies, e.g. ASC-US=1,HSIL=3; classes not listed get weight 0 (default: uniform)")
    gen.add_argument("--boxes", choices=ANNOTATED_BOXES, default=SETTINGS.boxes, help="each edited cell's box: painted, "
                     "the detected normal cell's box the editor painted it in (the paper); cell, the painted cell's "
                     "own extent inside it, as labelled sets draw boxes (the painted box kept as painted_boxes)")
    gen.add_argument("--empty-edits", choices=EMPTY_EDITS, default=SETTINGS.empty_edits, help="an edit whose box holds "
                     "no nucleus (glass or cytoplasm alone): keep, labelled as every edit is (the paper); drop, the cell "
                     "left as it was and annotated as a normal cell")
    gen.add_argument("--seed", type=int, default=CONFIG.seed, metavar="S", help="job seed: tile i's seed derives from (S, i) alone")
    gen.add_argument("--tiles-per-shard", type=int, default=CONFIG.tiles_per_shard, metavar="K", help="tiles per shard: the unit of work, commit and resume")
    gen.add_argument("--plan", help="JSON plan of cells per tile (see README)")
    gen.add_argument("--image-format", choices=storage.IMAGE_FORMATS, default=CONFIG.image_format, help="png and webp-lossless keep every pixel; jpg and webp (quality 95) are lossy, smaller")
    gen.add_argument("--tile-size", type=int, default=SETTINGS.tile_size, metavar="PX", help="tile side in pixels (paper: 1024; at least 256, the editor's crop)")
    gen.add_argument("--steps", type=int, default=SETTINGS.steps, help="DDIM steps (paper: 25)")
    gen.add_argument("--guidance", type=float, default=SETTINGS.guidance, help="CFG scale (paper: 5.0)")
    gen.add_argument("--device", help="torch device the models compute on, e.g. cuda, cuda:1, cpu (default: "
                     "cuda where available; under Ray, cuda on replicas that reserved GPUs, else cpu)")
    gen.add_argument("--batch-size", type=int, default=RUNTIME.batch_size, help="tiles per model call")
    gen.add_argument("--precision", choices=PRECISIONS, default=RUNTIME.precision, help="diffusion models' precision "
                     "(default auto: bf16 on CUDA, fp32 on CPU, where runs are byte-reproducible)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--check-real-tiles", type=int, default=RUNTIME.check_real_tiles, metavar="N",
                     help="decode N real tiles, spread over the job, before anything is written (every tile's header "
                          "size is always checked; a tile cut or corrupt past its header otherwise fails its shard "
                          "when read, and that shard is not committed)")
    gen.add_argument("--verify", action="store_true", help="on resume, hash every committed shard's tar against its "
                     "marker (sizes are always compared); a damaged shard is made again")
    gen.add_argument("--workers", type=_workers, default=(0, 0), metavar="W|MIN-MAX", help="Ray replicas: W, or MIN-MAX for a pool "
                     "that grows while shards wait and shrinks when they run out (default 0: in this process)")
    gen.add_argument("--ray-address", help="an existing Ray cluster (host:port, ray://host:port or auto)")
    gen.add_argument("--gpus-per-replica", type=float, help="GPUs each Ray replica reserves, may be fractional "
                     "(default: 1 when --device, or this machine, is CUDA; else 0: one CPU per replica)")
    gen.add_argument("--replica-timeout", type=float, default=REPLICA_TIMEOUT, metavar="SECONDS", help="stop the job "
                     "(exit 75, resumable) when no Ray replica is up for this long: none placed or loaded "
                     f"(default {REPLICA_TIMEOUT:g}: 30 min)")

    prev = commands.add_parser("preview", help="draw the contact sheet of a dataset (writes preview.png)")
    prev.add_argument("url", help="dataset URL (a generate --out)")
    prev.add_argument("--max-tiles", type=int, default=16, metavar="N", help="tiles on the contact sheet (the first N)")
    gen.set_defaults(run=generate)
    prev.set_defaults(run=preview)


def read_plan(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as err:
        raise InvalidInputError(f"cannot read plan {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"cannot read plan {path}: not UTF-8 text (byte {err.start})") from None


def generate(args: argparse.Namespace) -> int:
    config = from_args(GenerateConfig, args, plan=read_plan(args.plan))  # the plan's text, not its path
    runtime = from_args(Runtime, args)
    print(format_summary(run_job(config, runtime, executor_for(args, runtime))))
    return 0


def executor_for(args: argparse.Namespace, runtime: Runtime) -> ShardExecutor:
    """What runs the shards: this process, or a pool of Ray replicas when --workers or
    --ray-address asks for one."""
    if args.workers == (0, 0) and not args.ray_address:
        return LocalExecutor(runtime)
    from cytosynth.cluster.distributed import RayExecutor  # Ray only when asked for

    gpus = args.gpus_per_replica
    if gpus is None:
        cuda = args.device.startswith("cuda") if args.device else has_cuda_device()  # no torch on the driver
        gpus = 1.0 if cuda else 0.0
    workers = args.workers if args.workers != (0, 0) else (1, 1)
    return RayExecutor(runtime, workers, args.ray_address, gpus, args.replica_timeout)


def format_summary(summary: dict) -> str:
    run = summary.get("this_run") or {}
    made = run.get("tiles", summary["tiles"])
    rate = made / summary["seconds"] if summary["seconds"] else float("nan")
    stages, idle = run.get("stage_seconds") or {}, run.get("idle_seconds") or {}
    lines = [
        f"cytosynth: wrote {summary['tiles']} tiles in {summary['shards']} shards to {summary['out']}",
        f"  time       {summary['seconds']:.1f} s ({rate:.2f} tiles/s); this run made {made} tiles "
        f"in {run.get('shards', 0)} shards, by {_replicas(run.get('replicas', 0))}, {run.get('retried_shards', 0)} shards retried",
        "  stages     " + ", ".join(f"{s} {stages.get(s, 0.0):.1f} s" for s in STAGES)
        + " (busy seconds summed over replicas; encode and upload overlap synthesis)",
        "  waits      " + ", ".join(f"{s} {idle.get(s, 0.0):.1f} s" for s in IDLE_STAGES)
        + " (each stage waiting for the one before; stage2's is the device waiting for detection)",
        f"  abnormal   {sum(summary['cells'].values())} cells: "
        + ", ".join(f"{name} {count}" for name, count in summary["cells"].items()),
        f"  normal     {summary['normal_cells']} NILM cells annotated",
        "  files      job.json, shards/*.tar, stats/*.json, manifest.parquet, preview.png, _SUCCESS",
    ]
    return "\n".join(lines)


def _replicas(count: int) -> str:
    # Counts the replicas that made shards: a replica takes up to two shards as soon as it has
    # loaded, so with few shards the first one up may make them all (README, "On Ray").
    return f"{count} replica" + ("" if count == 1 else "s")


def preview(args: argparse.Namespace) -> int:
    if args.max_tiles < 1:
        raise InvalidInputError(f"--max-tiles must be at least 1, got {args.max_tiles}")
    url = storage.write_preview(args.url, max_tiles=args.max_tiles)
    print(f"cytosynth: wrote {url}")
    return 0
