"""Test-side helpers for the training jobs: a small real task for the harness, a local Ray
session, state-dict comparison, phantom shards, training data on the moto S3 server."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cytosynth import storage
from cytosynth.synth import InvalidInputError, draw_phantom_tile
from cytosynth.synth.ldm_training import freeze_all_but

RAY_SETTINGS = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 150 * 1024**2, "log_to_driver": False}


def start_ray() -> None:
    """A small local Ray for one test module; this module's tasks travel by value to the workers."""
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(**RAY_SETTINGS)


def fake_aws_env(s3_server: str) -> dict[str, str]:
    """Environment variables that point every AWS client at `s3_server`, with no real AWS config."""
    return {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "NO_PROXY": "127.0.0.1,localhost"}


@contextlib.contextmanager
def moto_bucket(s3_server: str, bucket: str) -> Iterator[str]:
    """A fresh bucket on `s3_server`, yielded as "s3://bucket", with this process's environment
    (so the Ray workers it starts too) pointing at the server until the block ends."""
    import pytest
    import s3fs

    with pytest.MonkeyPatch.context() as env:
        for name, value in fake_aws_env(s3_server).items():
            env.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
        yield f"s3://{bucket}"
        s3fs.S3FileSystem.clear_instance_cache()


def changed_parameters(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ between two state dicts (same keys required)."""
    assert before.keys() == after.keys(), set(before) ^ set(after)
    return sorted(k for k in before if not torch.equal(before[k].float(), after[k].float()))


def read_metrics(out: str) -> list[dict[str, Any]]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_phantom_shards(out: str, tiles: int, per_shard: int, size: int, abnormal: bool = False) -> str:
    """Committed cytosynth shards of phantom tiles: NILM boxes from the drawing; with `abnormal`,
    each tile's first cell relabelled LSIL. Returns `out`."""
    for shard in range(-(-tiles // per_shard)):
        writer = storage.ShardWriter(out, shard)
        for index in range(shard * per_shard, min(tiles, (shard + 1) * per_shard)):
            image, boxes = draw_phantom_tile(index, size)
            boxes = boxes.tolist()
            cells = boxes[:1] if abnormal else []
            annotation = {"boxes": cells, "labels": ["LSIL"] * len(cells), "normal_boxes": boxes[len(cells):],
                          "source": "synthetic", "seed": index}
            writer.add(index, image, annotation)
        writer.commit()
    return out


@dataclass(frozen=True)
class LineFitTask:
    """A complete harness task in a few lines: fit y = 3x - 1 with a frozen random tanh layer
    and a trainable linear read-out. `fail_after` batches, it raises (a corrupt input mid-run)."""

    fail_after: int | None = None
    name: str = "line-fit"

    def record(self) -> dict[str, Any]:
        return {"target": "3x-1"}

    def validate(self) -> None:
        pass

    def build(self, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        model = initial_line_model().to(device)
        return model, freeze_all_but(model, lambda name: name.startswith("2."))

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([seed, rank])
        for count in range(1, 10**9):
            if self.fail_after is not None and count > self.fail_after:
                raise InvalidInputError(f"sample {count} on rank {rank} is corrupt")
            x = torch.from_numpy(rng.uniform(-1, 1, (batch_size, 1)).astype(np.float32))
            yield x, 3 * x - 1

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def sample_images(self, model: torch.nn.Module, seed: int) -> np.ndarray:
        """The fitted curve as a bar chart, one 16x16 image per half of [-1, 1]."""
        x = torch.linspace(-1, 1, 32).reshape(-1, 1)
        heights = ((model(x).clamp(-4, 2) + 4) / 6 * 15).round().long().flatten().tolist()
        images = np.zeros((2, 16, 16, 3), np.uint8)
        for i, h in enumerate(heights):
            images[i // 16, 16 - h - 1 :, i % 16] = 255
        return images

    def save(self, model: torch.nn.Module, out_url: str) -> str:
        from safetensors.torch import save

        url = storage.join(out_url, "line.safetensors")
        storage.put_bytes(url, save({k: v.contiguous() for k, v in model.state_dict().items()}))
        return url


def initial_line_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@dataclass(frozen=True)
class SampledLineFitTask(LineFitTask):
    """LineFitTask that also writes, to `sampled_to`, the state dict of the model each sample grid
    is drawn from: the last one is the model after the final step (the harness samples then)."""

    sampled_to: str = ""

    def sample_images(self, model: torch.nn.Module, seed: int) -> np.ndarray:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, self.sampled_to)
        return super().sample_images(model, seed)


class EncoderCalls:
    """How many images each call of the VAE's encoder took (a forward hook on the real encoder)."""

    def __init__(self, vae):
        self.images: list[int] = []
        self._handle = vae.encoder.register_forward_hook(lambda module, args, out: self.images.append(args[0].shape[0]))

    def __enter__(self):
        return self.images

    def __exit__(self, *exc):
        self._handle.remove()
