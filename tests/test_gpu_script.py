"""bench/gpu.sh on CPU: its --dry-run plans the wheel install and both GPU benchmarks within the
8-minute budget, joins split wheels first, and a machine that lacks packages with no wheels for
them is told so in one line before anything runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"
BUDGET_S = 8 * 60


def gpu_sh(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, "--python", python], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def planned(stdout: str) -> list[list[str]]:
    """The commands a dry run prints (`+ ...` lines), as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def script_command(commands: list[list[str]], script: str) -> list[str]:
    (command,) = [c for c in commands if script in c]
    return command


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """An interpreter with the standard library only: a GPU machine that lacks every package."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def requirement_names() -> list[str]:
    specs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.match(r"[A-Za-z0-9_.-]+", spec).group(0) for spec in specs]


def test_dry_run_plans_both_gpu_benchmarks_within_eight_minutes(tmp_path):
    result = gpu_sh("--dry-run", "--wheels", str(tmp_path))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    throughput = script_command(commands, "bench/throughput.py")
    finetune = script_command(commands, "bench/finetune.py")
    assert throughput[throughput.index("--preset") + 1] == "sd15"
    assert throughput[throughput.index("--device") + 1] == "cuda" and "--append" in throughput
    assert finetune[finetune.index("--device") + 1] == "cuda"
    limits = [int(c[c.index("timeout") + 3]) for c in commands if "timeout" in c]
    assert len(limits) >= 2 and sum(limits) <= BUDGET_S
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_machine_without_packages_or_wheels_gets_one_error_line_naming_them(bare_python, tmp_path):
    result = gpu_sh("--dry-run", "--wheels", str(tmp_path), python=bare_python)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: this machine lacks ") and "bash bench/gpu.sh --fetch-wheels" in line
    for name in ("diffusers", "ray", "deepspeed", "webdataset", "clean-fid"):
        assert re.search(rf"\b{re.escape(name)}\b", line), name


def test_split_wheels_are_joined_before_the_offline_install(bare_python, tmp_path):
    for name in requirement_names():
        if name != "ray":
            (tmp_path / f"{name.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(b"")
    ray = "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    for part in ("00", "01"):
        (tmp_path / f"{ray}.part-{part}").write_bytes(b"half")
    (tmp_path / "deepspeed-1.0-py3-none-any.whl").unlink()
    (tmp_path / "deepspeed-0.19.8.tar.gz").write_bytes(b"")  # PyPI ships deepspeed as source only

    result = gpu_sh("--dry-run", "--wheels", str(tmp_path), python=bare_python)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert lines[0] == f"+ cat {tmp_path / ray}.part-* > {tmp_path / ray}"
    install = planned(result.stdout)[1]
    assert install[install.index("pip"):] == ["pip", "install", "--no-index", "--find-links", str(tmp_path),
                                              "--no-build-isolation", "-e", "."]
    assert not (tmp_path / ray).exists()  # planned, not done


def test_an_unknown_option_is_one_error_line():
    result = gpu_sh("--frobnicate")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown option --frobnicate (see bash bench/gpu.sh --help)"]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # imports torch and diffusers, as the two benchmarks do
def test_the_benchmarks_accept_the_options_the_script_passes(tmp_path):
    commands = planned(gpu_sh("--dry-run", "--wheels", str(tmp_path)).stdout)
    for name in ("throughput", "finetune"):
        command = script_command(commands, f"bench/{name}.py")
        args = load_bench(name).parse_args(command[command.index(f"bench/{name}.py") + 1:])
        assert args.device == "cuda"
        assert args.preset == "sd15" and args.tile_size == 1024
