"""The driver's cost: what `cytosynth` pays before any work (import, `--help`) and the peak memory of
the process driving a `generate --workers` job on Ray; the code before the light-driver work (a
base commit, extracted with `git archive`) against this checkout, side by side in one run.

Every figure comes from a fresh interpreter: wall and CPU seconds of `import cytosynth.jobs.cli`
plus `generate --help` (the parser built, as every argument error also pays), its peak RSS, and
whether torch or diffusers were imported; then one tiny Ray job (2 phantom tiles, one CPU
replica, local Ray started by the command) whose driver reports its own peak RSS and imports.

    python bench/driver.py --repeats 3            # base: the merge base of HEAD and main
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers")

# Run in the measured interpreter: the CLI's own main, then its figures as JSON on the last line.
_CHILD = r"""
import contextlib, io, json, resource, sys, time
wall, cpu = time.perf_counter(), time.process_time()
from cytosynth.jobs.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as exit:
        code = exit.code
print(json.dumps({
    "code": code, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "imported": [m for m in json.loads(sys.argv[2]) if m in sys.modules], "err": err.getvalue()[-500:],
}))
"""


def tree_of(rev: str | None, root: Path) -> Path:
    """A folder whose `cytosynth` is the code at `rev` (None: this checkout); for PYTHONPATH."""
    folder = root / (rev or "checkout")
    folder.mkdir(parents=True)
    if rev is None:
        (folder / "cytosynth").symlink_to(REPO)
    else:
        (folder / "cytosynth").mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder / "cytosynth")], input=archive, check=True)
    return folder


def measure(tree: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv), json.dumps(HEAVY)],
                            capture_output=True, text=True, env=env, cwd=tree, timeout=900)
    if result.returncode:
        raise SystemExit(f"measurement failed in {tree}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ray_job(out: Path) -> list[str]:
    return ["generate", "--out", str(out), "--workers", "1", "--gpus-per-replica", "0", "--num-tiles", "2",
            "--tiles-per-shard", "1", "--normal-source", "phantom", "--steps", "1", "--tile-size", "256",
            "--device", "cpu", "--batch-size", "2", "--quiet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the code before (default: git merge-base HEAD main)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per --help figure (median)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray job")
    args = parser.parse_args()
    base = args.base or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"before: {base[:7]} (git archive), after: this checkout at {head} (uncommitted changes included)")
    print("| code | phase | wall s (median) | CPU s (median) | peak RSS MiB (median) | torch / diffusers imported |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        trees = {"before": tree_of(base, Path(tmp)), "after": tree_of(None, Path(tmp))}
        for name, tree in trees.items():
            runs = [measure(tree, ["generate", "--help"]) for _ in range(args.repeats)]
            assert all(r["code"] == 0 for r in runs), runs
            row = [statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_rss_mib")]
            print(f"| {name} | import + `generate --help` (x{args.repeats}) | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.0f} "
                  f"| {', '.join(runs[0]['imported']) or 'neither'} |", flush=True)
        if not args.no_ray:
            for name, tree in trees.items():
                run = measure(tree, ray_job(Path(tmp) / f"out-{name}"))
                assert run["code"] == 0, run["err"]
                print(f"| {name} | driver of `generate --workers 1` (2 tiles, local Ray) | {run['wall_s']:.1f} | "
                      f"{run['cpu_s']:.1f} | {run['peak_rss_mib']:.0f} | {', '.join(run['imported']) or 'neither'} |",
                      flush=True)


if __name__ == "__main__":
    main()
