"""`cytosynth verify OUT [--repair]`: check a generate output shard by shard, repair it."""

from __future__ import annotations

import argparse

from cytosynth.synth.settings import PRECISIONS
from cytosynth.generation.runner import Runtime
from cytosynth.generation.repair import VerifyReport, check_job, repair_job
from cytosynth.storage import shard_name
from cytosynth.storage.errors import redact_url

from .generate import read_plan

EXIT_DAMAGED = 3  # problems found (and not repaired): distinct from bad input (2) and crashes (1)


def register(commands: argparse._SubParsersAction) -> None:
    ver = commands.add_parser("verify", help="check every shard of a generate output (size, SHA-256, job config, "
                              "manifest); --repair makes the bad ones again")
    ver.add_argument("out", help="the generate --out to check")
    ver.add_argument("--repair", action="store_true", help="make bad or missing shards again with the job's own "
                     "config, then rebuild manifest.parquet, preview.png and _SUCCESS")
    ver.add_argument("--plan", help="the job's plan file, when it was made with one (--repair)")
    ver.add_argument("--device", help="torch device for --repair (default: cuda where available)")
    ver.add_argument("--batch-size", type=int, default=4, help="tiles per model call for --repair (pixels are "
                     "identical for the same device and batch size)")
    ver.add_argument("--precision", choices=PRECISIONS, default="auto", help="diffusion models' precision for --repair "
                     "(default auto: bf16 on CUDA, fp32 on CPU)")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(run=verify)


def verify(args: argparse.Namespace) -> int:
    report = check_job(args.out)
    print(format_report(report))
    if args.repair and not report.ok:
        runtime = Runtime(args.device, args.batch_size, progress=not args.quiet, precision=args.precision)
        report = repair_job(args.out, report, runtime, read_plan(args.plan))
        print("cytosynth: repaired; checked again:\n" + format_report(report))
    return 0 if report.ok else EXIT_DAMAGED


def format_report(report: VerifyReport) -> str:
    lines = [f"  shard {shard_name(i)}: {problem}" for i, problem in report.problems.items()]
    if report.manifest:
        lines.append(f"  manifest.parquet: {report.manifest}")
    if report.ok:
        verdict = f"cytosynth: {redact_url(report.out)} is whole: {report.shards} shards verified"
    else:
        bad = f"{len(report.problems)} of {report.shards} shards bad" if report.problems else "shards whole"
        unfinished = "" if report.complete else ", not marked complete"
        verdict = f"cytosynth: {redact_url(report.out)}: {bad}{unfinished}; `cytosynth verify --repair` makes it whole"
    return "\n".join([*lines, verdict])
