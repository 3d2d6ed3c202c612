"""A training job's --out belongs to one job: another task's checkpoints are never resumed."""

from __future__ import annotations

import json
import os

import pytest
from training_helpers import write_phantom_shards

from cytosynth import storage
from cytosynth.cluster.training import COMPLETE_MARKER, checkpoint_url
from cytosynth.jobs import cli

TILE = 64


@pytest.mark.parametrize("other", ["finetune-abnormal", "train-detector"])
def test_a_checkpoint_of_another_task_is_refused_in_one_line_with_nothing_written(tmp_path, capsys, other):
    data = write_phantom_shards(str(tmp_path / "tiles"), tiles=2, per_shard=2, size=TILE)
    out = str(tmp_path / "out")
    storage.write_job_json(out, {"job": other, "batch_size": 1, "seed": 0})
    os.makedirs(checkpoint_url(out, 2))
    with open(os.path.join(checkpoint_url(out, 2), COMPLETE_MARKER), "w") as fh:
        fh.write("{}")
    before = sorted(os.listdir(out)), open(os.path.join(out, "job.json")).read()

    code = cli.main(["finetune-normal", "--data", data, "--out", out, "--tile-size", str(TILE), "--steps", "4",
                     "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "different job config" in err and "job" in err.split("differs in:")[1]
    assert (sorted(os.listdir(out)), open(os.path.join(out, "job.json")).read()) == before
    assert json.loads(before[1])["config"]["job"] == other
