"""Security (issue 13, items 1-4): no input file runs code, no write outside the job's folders,
no credential in Ray's logs or in any message the CLI prints (README "Security model")."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from cytosynth import storage
from cytosynth.training.checkpoints import COMPLETE_MARKER, checkpoint_url, load_checkpoint
from cytosynth.jobs.cli import main
from cytosynth.synth import InvalidInputError
from cytosynth.synth.extractors import load_feature_extractor

# Cheapest real job: one 256 px phantom tile, no abnormal cell (no stage-2 call), CPU.
CHEAP = ("--num-tiles", "1", "--normal-source", "phantom", "--steps", "2", "--tile-size", "256",
         "--cells", "0-0", "--device", "cpu", "--quiet")
SECRET, KEY = "se/cr3tVALUE", "AKIAEXAMPLEKEY"


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return captured.out + err


# --------------------------------------------------------------------------- 1. .pt2 pickles


class _Features(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class _RunsCode:
    """Unpickling this creates a folder: proof that loading ran code from the file."""

    path = ""

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def exported() -> bytes:
    torch.manual_seed(0)
    program = torch.export.export(
        _Features(), (torch.zeros(2, 3, 299, 299),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _rewritten(archive: bytes, edit) -> bytes:
    src, out = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = edit(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)
    return out.getvalue()


def _pickle_of(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickled_weight(marker: Path):
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["linear.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("weights/weight_0"):
            _RunsCode.path = str(marker)
            return _pickle_of(_RunsCode())
        return data
    return edit


def _unsafe_sample_inputs(marker: Path):
    def edit(name: str, data: bytes) -> bytes:
        if "sample_inputs/" in name:
            _RunsCode.path = str(marker)
            return _pickle_of(((_RunsCode(),), {}))
        return data
    return edit


def test_a_plain_export_program_loads(exported):
    assert load_feature_extractor(exported, "export", "ok.pt2").dim == 4


@pytest.mark.parametrize("edit", [_pickled_weight, _unsafe_sample_inputs], ids=["use_pickle-weight", "sample-inputs"])
def test_a_pt2_extractor_with_a_pickle_is_refused_before_any_of_it_runs(exported, edit, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    extractor = tmp_path / "evil.pt2"
    extractor.write_bytes(_rewritten(exported, edit(marker)))
    (tmp_path / "imgs").mkdir()
    rc = main(["fid", "--real", str(tmp_path / "imgs"), "--fake", str(tmp_path / "imgs"),
               "--feature-extractor", str(extractor), "--device", "cpu", "--quiet"])
    assert rc == 2 and not marker.exists()
    assert "evil.pt2" in one_error_line(capsys)


# --------------------------------------------------------------------------- 2. checkpoint markers


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped-abs", "sub/../../escaped", "..", "a\\..\\b"])
def test_a_checkpoint_marker_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    out = str(tmp_path / "job")
    url = checkpoint_url(out, 3)
    storage.put_bytes(storage.join(url, COMPLETE_MARKER), json.dumps({"step": 3, "files": [name]}).encode())
    with pytest.raises(storage.StorageError, match="not a plain file name") as info:
        load_checkpoint(None, out, 3)  # refused before the engine is used
    assert "\n" not in str(info.value)
    assert not Path("/tmp/escaped").exists() and not Path("/escaped").exists()
    assert not Path("/tmp/escaped-abs").exists()


# --------------------------------------------------------------------------- 3. Ray runtime_env


def test_replicas_runtime_env_carries_storage_settings_but_never_credentials(monkeypatch):
    from cytosynth.cluster.ray_session import forwarded_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-" + SECRET)
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert SECRET not in json.dumps(env) and KEY not in json.dumps(env)


# --------------------------------------------------------------------------- 4. messages


def test_credentials_in_an_s3_url_are_not_in_the_error_line(s3_bucket, capsys):
    # botocore quotes the "bucket" KEY:SECRET@bucket without its scheme.
    rc = main(["generate", "--out", f"s3://{KEY}:{SECRET}@{s3_bucket[5:]}/x", *CHEAP])
    text = one_error_line(capsys)
    assert rc == 2 and SECRET not in text and KEY not in text


def test_credentials_in_a_detector_url_are_not_in_the_error_line(tmp_path, capsys):
    rc = main(["generate", "--out", str(tmp_path / "out"), "--detector", f"http://user0:{SECRET}@127.0.0.1:1/d.safetensors", *CHEAP])
    text = one_error_line(capsys)
    assert rc == 2 and SECRET not in text and "d.safetensors" in text


def test_credentials_in_the_output_url_are_not_in_the_summary(capsys):
    out = f"memory://user0:{SECRET}@secure-summary/out"
    assert main(["generate", "--out", out, *CHEAP]) == 0
    captured = capsys.readouterr()
    assert "memory://***@secure-summary/out" in captured.out
    assert SECRET not in captured.out + captured.err
    assert SECRET not in storage.get_bytes(out + "/job.json").decode() + storage.get_bytes(out + "/_SUCCESS").decode()


def test_an_unexpected_error_is_one_line_and_a_private_log_with_the_redacted_traceback(tmp_path, capsys, monkeypatch):
    import cytosynth.jobs.generate as generate_job

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom at s3://{KEY}:{SECRET}@bucket/x")

    monkeypatch.setattr(generate_job, "run_job", broken)
    rc = main(["generate", "--out", str(tmp_path / "out"), *CHEAP])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: RuntimeError: boom") and "Traceback" not in err
    log = Path(err.rsplit("traceback in ", 1)[1].rstrip(")\n"))
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    text = log.read_text()
    assert "Traceback" in text and "broken" in text and SECRET not in text and KEY not in text + err
    log.unlink()
