"""The training loop every job shares: a task's model in a DeepSpeed engine, one per rank.

ZeRO stage 2 (optimizer states and gradients partitioned over the ranks), bf16 on GPU, fp32 on
CPU (there, 2+ ranks talk over gloo with `DS_ACCELERATOR=cpu`). Every job -- finetune-normal,
finetune-abnormal, train-detector -- is this loop; what differs is a *task*. This module is
Ray-free: `start_job` is the driver's part, `train_rank` one rank's; `cluster/ray_train.py:train`
runs the ranks as Ray Train workers (`--workers` of them).

How a job plugs in
------------------
A task is a picklable object (a dataclass of its own settings) with these members; the harness
calls `validate` (and `settle`) on the driver and the rest on every rank:

    name: str                                    "finetune-normal": logs, job.json
    trains_in_bf16: bool                         False keeps the task in fp32 even on GPUs
                                                 (see "Precision" below)
    record() -> dict                             settings that define the model (job.json; a
                                                 resume into the same --out must match them)
    validate() -> None                           driver, before anything is written or Ray
                                                 starts: check the data and weights, raise
                                                 InvalidInputError / StorageError (one line)
    settle(config) -> config                     optional, driver, right after validate: the
                                                 settings the data decides (train-detector:
                                                 --epochs as steps, the arch's lr)
    build(device) -> (module, trainable params)  the model on `device`, everything but the
                                                 returned parameters frozen (synth.ldm_training
                                                 .freeze_all_but); the harness optimizes those
    batches(rank, world_size, batch_size, seed)  an endless iterator of this worker's
            -> Iterator[batch]                   micro-batches (its 1/world_size of the data,
                                                 streamed, reshuffled each epoch from `seed`)
    loss(module, batch) -> Tensor                scalar loss of one micro-batch (the task moves
                                                 the batch to the module's device and dtype)
    sample_images(module, seed) -> uint8 array   (N, H, W, 3) images for the progress grid
    save(module, out_url) -> str                 write the artifact users load under out_url,
                                                 each object whole (storage.put_bytes); return
                                                 its URL. Called on rank 0 only, at the end,
                                                 with the trainable parameters in float32

and optionally, for model selection ("keep the best step", e.g. by FID):

    select(module, out_url, step, final)         rank 0, in eval mode, at every checkpoint step
            -> dict | None                       (before its checkpoint) and the final step:
                                                 score the model, record it; None: no selection.
                                                 With "save_to": best so far, the harness saves
                                                 it there now (task.save, float32). When a task
                                                 selects, the end saves nothing more (the task
                                                 has put the best model's artifact in place) and
                                                 the final verdict, with "artifact", goes into
                                                 the summary

and `TrainConfig` holds what every job shares. `cluster.ray_train.train(config, task)` runs it
and returns the summary. The harness owns everything else:

    <out>/job.json                        task.record() + optimizer settings, versions (first)
    <out>/checkpoints/step_000500/        DeepSpeed checkpoint of the trainable parameters and
                                          the partitioned optimizer state, each rank uploading
                                          its own files
    <out>/checkpoints/step_000500/COMPLETE  written last, once every rank's files are up: a
                                          checkpoint without it is never resumed from
    <out>/metrics.jsonl                   one JSON line per step: step, loss (mean over
                                          workers), samples_per_s, lr, run (0, then 1 after
                                          the first resume, ...), on GPUs gpu_peak_gib (rank 0's
                                          peak allocated memory so far)
    <out>/samples/step_000500.png         grid of task.sample_images every sample_every steps
    <out>/<artifact>                      task.save, at the end
    <out>/_SUCCESS                        the summary, last

Precision
---------
`--precision auto` (the default) trains in bf16 on GPUs and fp32 on CPUs; `bf16` forces it (also
on CPU, which is how the tests reproduce the GPU run). Under bf16 DeepSpeed casts the *parameters*
of the module to bf16; whether it casts the floating-point *buffers* too depends on its version
(before 0.19.2: `module.bfloat16()`, buffers included; since: parameters only). A task must give
the same result either way, so tasks never rely on a buffer's dtype: they cast what they feed a
layer to that layer's parameter dtype. A task that cannot train in bf16 says so
(`trains_in_bf16 = False`) and the harness keeps it in fp32.

Re-running with the same --out resumes from the last complete checkpoint (partial ones are
removed), keeps the metrics up to that step and continues; a finished run is not repeated.
Checkpoints are read with `torch.load(weights_only=True)` (DeepSpeed's own loader unpickles).
Batches are not replayed after a resume: the data order restarts from a seed that includes the
resumed step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.storage.job import SUCCESS_NAME
from cytosynth.synth import InvalidInputError

from .checkpoints import latest_checkpoint, load_checkpoint, remove_checkpoints, safe_checkpoint_engine, save_checkpoint
from .metrics_log import MetricsLog
from .train_config import OPTIMIZERS, PRECISIONS, TrainConfig

SAMPLES_DIR = "samples"


class TrainingTask(Protocol):
    name: str
    trains_in_bf16: bool

    def record(self) -> dict[str, Any]: ...
    def validate(self) -> None: ...
    def build(self, device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]: ...
    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> Iterator[Any]: ...
    def loss(self, module: torch.nn.Module, batch: Any) -> torch.Tensor: ...
    def sample_images(self, module: torch.nn.Module, seed: int) -> np.ndarray: ...
    def save(self, module: torch.nn.Module, out_url: str) -> str: ...


# --------------------------------------------------------------------------- driver


def start_job(config: TrainConfig, task: TrainingTask) -> tuple[TrainConfig, int | None]:
    """The driver's part, before any rank starts: every check, then job.json (written or matched).
    Returns the config with what the task's data settles, and the step to resume from (0: a new
    run), or None when the run in `config.out` is already finished (its summary is `_SUCCESS`)."""
    check_config(config, settled=not hasattr(task, "settle"))
    storage.ensure_writable(config.out)
    task.validate()
    if hasattr(task, "settle"):
        config = task.settle(config)
        check_config(config)
    # Before anything else looks at --out: a finished run with other settings is refused too.
    storage.write_job_json(
        config.out, {"job": task.name, **config.record(), "precision": "bf16" if uses_bf16(config, task) else "fp32", **task.record()}
    )
    if storage.is_complete(config.out):
        return config, None
    storage.remove_temp_files(config.out)  # what a killed run's writes left; no rank runs yet
    resume_step = latest_checkpoint(config.out)
    if resume_step and not config.resume:
        raise InvalidInputError(f"{config.out} holds a checkpoint at step {resume_step}; resume or use a new --out")
    if resume_step and resume_step >= config.steps:
        raise InvalidInputError(f"{config.out} is checkpointed at step {resume_step}, beyond --steps {config.steps}")
    return config, resume_step


def check_config(config: TrainConfig, settled: bool = True) -> None:
    """Options that are wrong whatever the data: one-line InvalidInputError before any work.
    Unless `settled`, --steps and --lr may still be unset (the task's `settle` sets them)."""
    def given(value: Any) -> bool:
        return value is not None or settled

    for name in ("steps", "batch_size", "workers", "checkpoint_every", "sample_every", "log_every", "keep_checkpoints"):
        if given(getattr(config, name)) and getattr(config, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if given(config.lr) and not config.lr > 0:
        raise InvalidInputError("--lr must be positive")
    if config.zero_stage not in (0, 1, 2):
        raise InvalidInputError("--zero-stage must be 0, 1 or 2")
    if config.precision not in PRECISIONS:
        raise InvalidInputError(f"unknown --precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")


def uses_bf16(config: TrainConfig, task: TrainingTask) -> bool:
    """Whether DeepSpeed runs the task in bf16: asked for (or auto on GPU) and the task allows it."""
    wanted = config.precision == "bf16" or (config.precision == "auto" and config.use_gpu)
    return wanted and task.trains_in_bf16


def read_summary(out: str) -> dict[str, Any]:
    return json.loads(storage.get_bytes(storage.join(out, SUCCESS_NAME)))


# --------------------------------------------------------------------------- worker


def train_rank(
    config: TrainConfig, task: TrainingTask, rank: int, world_size: int, device: torch.device,
    report: Callable[[dict[str, Any]], None],
) -> None:
    """One rank of a job, in an initialised torch.distributed group of `world_size`: build the
    task's model on `device`, wrap it in DeepSpeed, train, checkpoint. Rank 0 keeps the metrics,
    the sample grids, the artifact and `_SUCCESS`, and passes each step's row to `report`."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel("WARNING")
    start_step = latest_checkpoint(config.out)
    seed = run_seed(config.seed, start_step)
    torch.manual_seed(seed + rank)  # noise and timesteps differ per rank

    module, trainable = task.build(device)
    engine, *_ = deepspeed.initialize(
        model=_LossModule(task, module),
        optimizer=build_optimizer(config, trainable),
        model_parameters=trainable,
        config=deepspeed_config(config, world_size, uses_bf16(config, task)),
    )
    engine.checkpoint_engine = safe_checkpoint_engine(engine)
    if start_step:
        load_checkpoint(engine, config.out, start_step)
    metrics = MetricsLog(config.out, start_step, config.log_every) if rank == 0 else None
    if rank == 0 and not start_step:
        remove_checkpoints(config.out, keep=0)  # a crashed first run may have left a partial one

    batches = task.batches(rank, world_size, config.batch_size, seed)
    selected = None  # the task's last model-selection verdict
    for step in range(start_step + 1, config.steps + 1):
        started = time.perf_counter()
        loss = engine(next(batches))
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / world_size
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"loss is {mean_loss} at step {step}; lower --lr or check the data")
        if rank == 0:
            row = {
                "step": step,
                "loss": mean_loss,
                "samples_per_s": config.batch_size * world_size / (time.perf_counter() - started),
                "lr": engine.get_lr()[0],
            }
            if config.use_gpu:  # how close a worker runs to its GPU's memory
                row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            metrics.add(row)
            report(row)
            if step % config.sample_every == 0 or step == config.steps:
                _write_sample_grid(task, engine.module.model, config, step)
        if step % config.checkpoint_every == 0 or step == config.steps:  # before the checkpoint: see _select
            selected = _select(task, engine.module.model, trainable, config.out, step, step == config.steps, rank)
        if step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(engine, config.out, step, rank, config.keep_checkpoints)
            if rank == 0:
                metrics.flush()  # the metrics up to a checkpoint survive a crash after it

    if selected is None:  # no model selection: the artifact is the last step's model
        with _float32_trainable(trainable):  # collective: every rank takes part
            if rank == 0:
                selected = {"artifact": task.save(engine.module.model, config.out)}
    if rank == 0:
        metrics.flush()
        summary = {"job": task.name, "out": config.out, "artifact": selected.pop("artifact"), "steps": config.steps,
                   "final_loss": metrics.rows[-1]["loss"], "workers": world_size, **selected}
        storage.put_bytes(storage.join(config.out, SUCCESS_NAME), json.dumps(summary, indent=2).encode())
    dist.barrier()


def train_in_process(config: TrainConfig, task: TrainingTask, resume_step: int) -> None:
    """The job as one rank in this process: `train_rank` in a torch.distributed group of one
    (gloo on CPU, nccl on GPU), the progress bar fed directly. The same DeepSpeed engine,
    checkpoints and outputs as one Ray Train rank, without Ray's start-up.

    The group is made on the first run and kept for the next ones in this process (the
    augmentation study trains two): DeepSpeed caches its groups, so a group made anew would not
    be the one it holds."""
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read on DeepSpeed's first accelerator query
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if config.use_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("one rank in a process that is part of a larger torch.distributed group; use Ray (--workers)")
    device = torch.device("cuda", torch.cuda.current_device()) if config.use_gpu else torch.device("cpu")
    rank_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}  # DeepSpeed reads them
    saved = {name: os.environ.get(name) for name in rank_env}
    os.environ.update(rank_env)
    try:
        with StepBar(config, resume_step, task.name) as bar:
            train_rank(config, task, 0, 1, device, report=bar.show)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class StepBar:
    """The driver's progress bar over a job's steps, showing rank 0's loss and speed."""

    def __init__(self, config: TrainConfig, resume_step: int, name: str) -> None:
        self.bar = tqdm(total=config.steps, initial=resume_step, unit="step", desc=name, disable=not config.progress)

    def show(self, row: dict[str, Any]) -> None:
        self.bar.update(row["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.2f}")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_seed(seed: int, start_step: int) -> int:
    """The seed of one run of a job (data order, noise; rank 0's model init when start_step is 0)."""
    return int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0])


class _LossModule(torch.nn.Module):
    """What DeepSpeed wraps: the task's model, with the task's loss as its forward."""

    def __init__(self, task: TrainingTask, model: torch.nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A plain torch optimizer: DeepSpeed's fused CPU Adam would need a C++ build on every node."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=config.lr, weight_decay=config.weight_decay)


def deepspeed_config(config: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.batch_size * world_size,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": config.max_grad_norm,
        # torch's SGD is not on DeepSpeed's ZeRO list, though ZeRO-2 only partitions its state.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


class _float32_trainable:
    """Temporarily give the trainable parameters their full fp32 values (ZeRO's master copy
    under bf16), so the artifact is saved at full precision. Every rank must enter it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params

    def __enter__(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        self.saved = [p.data for p in self.params]
        for p in self.params:
            full = safe_get_full_fp32_param(p)  # all-reduce of the partitions
            p.data = (full if full is not None else p.data).detach().float().to(p.device)

    def __exit__(self, *exc: object) -> None:
        for p, data in zip(self.params, self.saved):
            p.data = data


def _select(task: TrainingTask, module: torch.nn.Module, trainable: list[torch.nn.Parameter], out: str,
            step: int, final: bool, rank: int) -> dict[str, Any] | None:
    """Model selection, for a task with `select`: rank 0 scores and every rank gets its verdict, so
    all enter the float32 collective together when the model is to be saved (rank 0 saves).

    Called before the step's checkpoint: a complete checkpoint implies its step's score is
    recorded, so a resume never skips a score (the task drops those after the last checkpoint)."""
    import torch.distributed as dist

    if not hasattr(task, "select"):
        return None
    verdict = [None]
    if rank == 0:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            verdict[0] = task.select(module, out, step, final)
        module.train(was_training)
    dist.broadcast_object_list(verdict, src=0)
    selected = verdict[0]
    if selected is not None and "save_to" in selected:
        with _float32_trainable(trainable):  # collective: every rank takes part
            if rank == 0:
                task.save(module, selected["save_to"])
        selected = {k: v for k, v in selected.items() if k != "save_to"}
    return selected


def _write_sample_grid(task: TrainingTask, module: torch.nn.Module, config: TrainConfig, step: int) -> None:
    was_training = module.training
    module.eval()
    with torch.no_grad():
        images = task.sample_images(module, config.seed)  # the same seed each time: comparable grids
    module.train(was_training)
    url = storage.join(config.out, SAMPLES_DIR, f"step_{step:06d}.png")
    storage.put_bytes(url, storage.encode_image(image_grid(images)))


def image_grid(images: np.ndarray, gutter: int = 4) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one near-square uint8 grid image with white gutters."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + gutter) + gutter, cols * (w + gutter) + gutter, 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = gutter + (i // cols) * (h + gutter), gutter + (i % cols) * (w + gutter)
        grid[y : y + h, x : x + w] = image
    return grid


