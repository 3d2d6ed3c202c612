"""The generate path (docs/design.md#generate-path): from `main` to the bytes of a shard, a short
stack of cytosynth's own calls, the one a newcomer reads in docs/design.md."""

from __future__ import annotations

import traceback
from pathlib import Path

import cytosynth.storage.objects as objects
from cytosynth.jobs.cli import main

ROOT = Path(objects.__file__).resolve().parents[1]  # the checkout: one folder per package
PACKAGES = [ROOT / p for p in ("synth", "storage", "evaluation", "generation", "training", "cluster", "jobs")]
CHEAP = ["--num-tiles", "2", "--tiles-per-shard", "2", "--normal-source", "phantom", "--steps", "1",
         "--tile-size", "256", "--quiet"]


def own_calls_to_each_tar_write(monkeypatch) -> list[list[str]]:
    """The stack of cytosynth calls ('file:function') above `write_whole` each time a shard's tar
    is written."""
    stacks, write = [], objects.write_whole

    def spy(fs, path, data, **kwargs):
        if path.endswith(".tar"):
            frames = [(Path(f.filename).resolve(), f.name) for f in traceback.extract_stack()[:-1]]
            stacks.append([f"{file.relative_to(ROOT)}:{name}" for file, name in frames
                           if any(file.is_relative_to(p) for p in PACKAGES)])
        return write(fs, path, data, **kwargs)

    monkeypatch.setattr(objects, "write_whole", spy)
    return stacks


def test_a_shard_is_written_eight_calls_below_main_on_the_path_design_md_draws(tmp_path, monkeypatch):
    stacks = own_calls_to_each_tar_write(monkeypatch)
    assert main(["generate", "--out", str(tmp_path / "out"), *CHEAP]) == 0
    assert stacks == [[
        "jobs/cli.py:main",
        "jobs/generate.py:generate",
        "generation/runner.py:run_job",
        "generation/runner.py:run",  # LocalExecutor.run
        "generation/shard_maker.py:run",  # ShardMaker.run
        "storage/shards.py:commit",
        "storage/objects.py:put_bytes",
        "storage/retry.py:retrying",  # which calls storage/objects.py:write_whole
    ]]
    design = (ROOT / "docs" / "design.md").read_text()
    for call in ("jobs/cli.py:main", "jobs/generate.py:generate", "generation/runner.py:run_job",
                 "generation/runner.py:LocalExecutor.run", "generation/shard_maker.py:ShardMaker.run",
                 "storage/shards.py:ShardWriter.commit", "storage/objects.py:put_bytes",
                 "storage/retry.py:retrying", "storage/objects.py:write_whole"):
        assert call in design, f"docs/design.md's generate path does not name {call}"
