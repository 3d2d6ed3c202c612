"""bf16 training as DeepSpeed does it on GPUs, reproduced on the CPU.

DeepSpeed's bf16 mode casts the module before the first step, and how depends on its version:
since 0.19.2 it casts the *parameters* only and keeps floating-point buffers in fp32; before, it
called `module.bfloat16()`, buffers included. Each training task must take a step under both
casts (training.loop, "Precision"); a task that cannot train in bf16 says so and the harness
keeps it in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import write_phantom_shards

from cytosynth.training.abnormal_cells import AbnormalCellTask
from cytosynth.training.normal_lora import NormalLoraTask
from cytosynth.training.detector_task import DetectorTask
from cytosynth.training.loop import TrainConfig, uses_bf16

TILE = 64


def cast_parameters_only(module: torch.nn.Module) -> None:
    """DeepSpeed >= 0.19.2 (`_cast_module_mixed_precision`): parameters to bf16, buffers untouched."""
    for parameter in module.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)


def cast_whole_module(module: torch.nn.Module) -> None:
    """DeepSpeed < 0.19.2: `module.bfloat16()`, floating-point buffers included."""
    module.bfloat16()


CASTS = {"parameters only (DeepSpeed >= 0.19.2)": cast_parameters_only, "whole module (older)": cast_whole_module}


@pytest.fixture(scope="module")
def normal_tiles(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("nilm") / "tiles"), tiles=2, per_shard=2, size=TILE)


@pytest.fixture(scope="module")
def abnormal_tiles(tmp_path_factory) -> str:
    return write_phantom_shards(str(tmp_path_factory.mktemp("cells") / "tiles"), tiles=2, per_shard=2, size=320, abnormal=True)


def one_bf16_step(task, cast) -> None:
    """Build the task's model, cast it as DeepSpeed would, and take a loss + backward on a batch."""
    torch.manual_seed(0)
    model, trainable = task.build(torch.device("cpu"))
    cast(model)
    batch = next(task.batches(0, 1, 2, seed=0))
    loss = task.loss(model, batch)
    loss.backward()
    assert loss.dtype in (torch.float32, torch.bfloat16) and math.isfinite(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_finetune_normal_takes_a_bf16_step_under_either_cast(normal_tiles, cast):
    one_bf16_step(NormalLoraTask(normal_tiles, tile_size=TILE), cast)


@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_finetune_abnormal_takes_a_bf16_step_under_either_cast(abnormal_tiles, cast):
    """The class embeddings are buffers: fp32 under the new cast, bf16 under the old one."""
    task = AbnormalCellTask(abnormal_tiles)
    model, _ = task.build(torch.device("cpu"))
    cast_parameters_only(model)
    assert model.prompt_embeddings.dtype == torch.float32  # the case that failed ("mat1 and mat2 ...")
    one_bf16_step(task, cast)


@pytest.mark.parametrize("arch", ["fasterrcnn", "retinanet"])
def test_detectors_train_in_fp32_even_when_bf16_is_asked_for(arch):
    """In bf16 the anchors lose up to 4 px at 1024 and BatchNorm's fp32 buffers meet bf16
    activations: the detector task opts out, and the harness honours it on GPU and on request."""
    task = DetectorTask("unused", labels="nilm", image_size=TILE, arch=arch)
    assert not task.trains_in_bf16
    for config in (TrainConfig(out="unused", precision="bf16"), TrainConfig(out="unused", use_gpu=True)):
        assert not uses_bf16(config, task)
    assert uses_bf16(TrainConfig(out="unused", precision="bf16"), NormalLoraTask("unused"))
    assert uses_bf16(TrainConfig(out="unused", use_gpu=True), AbnormalCellTask("unused"))
