"""A light driver: the command line and the Ray driver of `generate` import neither torch nor
diffusers (seconds and ~1 GB each time); the model checks happen where the models load (the
replicas) and fail with the same one `error:` line and exit code as a local run.

Each check runs in a fresh interpreter: this test process has long imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cytosynth.jobs.cli import EXIT_USER_ERROR, main

HEAVY = ("torch", "diffusers", "transformers", "torchvision")

# Runs `argv_list` (a JSON list of argument lists) through the CLI's `main` in one interpreter;
# prints, on its last line, each run's exit code and stderr, and which HEAVY modules got imported.
_RUN_CLI = r"""
import contextlib, io, json, sys
from cytosynth.jobs.cli import main
heavy, runs = json.loads(sys.argv[1]), []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse: --help, bad options
            code = exit.code
    runs.append({"argv": argv, "code": code, "err": err.getvalue()})
print(json.dumps({"runs": runs, "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


def run_cli_in_fresh_interpreter(argvs: list[list[str]], prelude: str = "") -> dict:
    code = prelude + _RUN_CLI
    result = subprocess.run([sys.executable, "-c", code, json.dumps(HEAVY), json.dumps(argvs)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def subcommands() -> list[str]:
    from cytosynth.jobs.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_help_and_every_bad_option_imports_neither_torch_nor_diffusers():
    names = subcommands()
    assert {"generate", "preview", "fid", "eval-detector", "train-detector", "finetune-normal"} <= set(names)
    argvs = [["--help"], *([name, "--help"] for name in names), *([name, "--no-such-option"] for name in names),
             ["generate", "--out", "x", "--cells", "many"]]  # a bad value, checked by its own parser type
    report = run_cli_in_fresh_interpreter(argvs)
    assert report["imported"] == []
    codes = {tuple(run["argv"]): run["code"] for run in report["runs"]}
    assert all(codes[(name, "--help")] == 0 for name in names) and codes[("--help",)] == 0
    assert all(codes[(name, "--no-such-option")] == 2 for name in names)
    bad_value = report["runs"][-1]
    assert bad_value["code"] == 2 and "expected MIN-MAX" in bad_value["err"]


def test_synth_still_exports_every_public_name():
    import cytosynth.synth as synth

    assert set(synth.__all__) <= set(dir(synth))
    assert all(getattr(synth, name) is not None for name in synth.__all__)
    with pytest.raises(AttributeError):
        synth.no_such_name  # noqa: B018


def test_the_drivers_gpu_check_agrees_with_torch_and_honours_cuda_visible_devices(monkeypatch):
    import torch

    from cytosynth.jobs.common import has_cuda_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert has_cuda_device() == torch.cuda.is_available()  # generate's default --gpus-per-replica
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not has_cuda_device()


# --------------------------------------------------------------------------- generate under Ray

# The job of tests/test_distributed.py, smaller: two phantom tiles, one replica on CPU.
TINY_JOB = ["--num-tiles", "2", "--tiles-per-shard", "1", "--normal-source", "phantom", "--steps", "1",
            "--tile-size", "256", "--device", "cpu", "--batch-size", "2", "--quiet"]
# One Ray for the three jobs, started by the caller: run_distributed uses a connected session as is.
_RAY_PRELUDE = """
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         object_store_memory=150 * 1024**2)
"""


@pytest.mark.slow
def test_generate_under_ray_keeps_the_driver_light_and_model_errors_one_line(tmp_path, capsys):
    good, missing_detector, no_weights = (str(tmp_path / name) for name in ("good", "detector", "sd15"))
    bad_jobs = {
        missing_detector: ["--detector", str(tmp_path / "nope.safetensors")],  # read by the replica
        no_weights: ["--preset", "sd15"],  # sd15 without --model-dir: the replica's load_models refuses
    }
    ray_argvs = [["generate", "--out", out, "--workers", "1", "--gpus-per-replica", "0", *TINY_JOB, *extra]
                 for out, extra in {good: [], **bad_jobs}.items()]
    report = run_cli_in_fresh_interpreter(ray_argvs, _RAY_PRELUDE)

    assert report["imported"] == []  # the driver ran a whole job, and two failed ones, without them
    good_run, *bad_runs = report["runs"]
    assert good_run["code"] == 0, good_run["err"]
    assert json.loads((tmp_path / "good" / "_SUCCESS").read_text())["tiles"] == 2
    for run, (out, extra) in zip(bad_runs, bad_jobs.items()):
        # The same job in this process (no Ray): the line and the exit code a local run gives.
        local_code = main(["generate", "--out", out + "-local", *TINY_JOB, *extra])
        local_err = capsys.readouterr().err
        assert (run["code"], run["err"]) == (local_code, local_err.replace(out + "-local", out))
        assert run["code"] == EXIT_USER_ERROR and run["err"].startswith("error: ") and run["err"].count("\n") == 1
