"""README commands that fit on a CPU run in the suite as written.

A block preceded by `<!-- runs: NAME ... -->` is run here, blocks of one NAME in README order in
one working folder: shell blocks with bash (`cytosynth` on PATH), python blocks in one namespace.
Commands that need a GPU, a cluster or real weights are checked for their flags by
tests/test_readme_options.py (each line through the parser) and for the files they name below.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cytosynth import storage
from cytosynth.jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_MARKED = re.compile(r"^<!-- runs: ([\w-]+)[^>]*-->\n```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Files the README names that another branch adds (merged together with this one).
def marked_blocks(name: str) -> list[tuple[str, str]]:
    return [(language, code) for block, language, code in _MARKED.findall(README.read_text(encoding="utf-8"))
            if block == name]


def run_blocks(name: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], dict]:
    """Run the README's `name` blocks in `folder`, in order: the shell blocks' stdout, and the
    python blocks' namespace."""
    blocks = marked_blocks(name)
    assert blocks, f"README has no block marked `<!-- runs: {name} -->`"
    monkeypatch.chdir(folder)
    namespace: dict = {}
    outputs = []
    for i, (language, code) in enumerate(blocks):
        if language == "python":
            # From a real file, as a user's script would be: torch.jit.script reads class sources.
            script = folder / f"readme_{name}_{i}.py"
            script.write_text(code, encoding="utf-8")
            exec(compile(code, str(script), "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=dict(os.environ),
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"README block failed:\n{code}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    return outputs, namespace


def test_every_marked_block_name_has_a_test():
    names = {block for block, _, _ in _MARKED.findall(README.read_text(encoding="utf-8"))}
    assert names == {"small-run", "s3", "fid", "notebook"}, names


def test_every_repository_file_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w/.-])((?:bench|cluster|docs|tests|jobs|synth|storage|\.ci)/[\w./-]*\w)", text))
    missing = sorted(p for p in named if not (ROOT / p).exists() and "*" not in p)
    assert not missing, missing


@pytest.mark.slow
def test_the_small_local_run_runs_as_written(tmp_path, monkeypatch):
    run_blocks("small-run", tmp_path, monkeypatch)
    assert (tmp_path / "small-run" / "_SUCCESS").exists()
    assert (tmp_path / "small-run" / "preview.png").stat().st_size > 0
    assert len(storage.read_manifest(str(tmp_path / "small-run"))) == 4


@pytest.mark.slow
def test_the_notebook_snippet_runs_as_written(tmp_path, monkeypatch):
    _, namespace = run_blocks("notebook", tmp_path, monkeypatch)
    first = namespace["samples"][0]
    assert first.image.shape == (256, 256, 3) and len(first.annotation["boxes"]) >= 1


@pytest.mark.slow
def test_the_s3_quickstart_runs_as_written(s3_bucket, tmp_path, monkeypatch):
    import s3fs

    # s3_bucket points AWS_ENDPOINT_URL and credentials at the moto server, as the README's exports would.
    fs = s3fs.S3FileSystem()
    if not fs.exists("my-bucket"):
        fs.mkdir("my-bucket")
    run_blocks("s3", tmp_path, monkeypatch)
    assert fs.exists("my-bucket/cytosynth/demo/_SUCCESS")
    assert fs.exists("my-bucket/cytosynth/demo/preview.png")


def test_a_missing_bucket_is_the_one_line_the_s3_quickstart_shows(s3_bucket, capsys):
    code = main(["generate", "--normal-source", "phantom", "--num-tiles", "1", "--tile-size", "256", "--quiet",
                 "--out", "s3://no-such-bucket/demo"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: output s3://no-such-bucket/demo is not writable: "), err
    assert "error: output s3://no-such-bucket/demo is not writable: ..." in README.read_text(encoding="utf-8")


class InceptionStandIn(torch.nn.Module):
    """Laid out like clean-fid's inception-2015-12-05.pt (`layers` to pooled features, `output`
    1008 logits), random and tiny: the real file cannot be downloaded here. 16-d rather than
    2048-d: FID's matrix square root of 2048 x 2048 takes minutes on a loaded 2-core machine."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 16, 1)
        )
        self.output = torch.nn.Linear(16, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).flatten(1))


@pytest.mark.slow
def test_the_fid_quickstart_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.jit.script(InceptionStandIn().eval()).save(str(tmp_path / "models" / "inception-2015-12-05.pt"))
    outputs, _ = run_blocks("fid", tmp_path, monkeypatch)
    report = json.loads((tmp_path / "fid.json").read_text())
    assert report["real"]["images"] == report["fake"]["images"] == 10
    assert report["fid"] > 0 and "kid" in report and report["is"]["splits"] == 1
    # The domain extractor the README scripts: 512-d ResNet-18 features.
    assert "512-d features" in outputs[-1] and "FID" in outputs[-1]
