"""The fine-tuning harness: a Ray Train `TorchTrainer` whose workers each run a DeepSpeed engine.

ZeRO stage 2 (optimizer states and gradients partitioned over the workers), bf16 on GPU, fp32 on
CPU (there, 2+ workers talk over gloo with `DS_ACCELERATOR=cpu`). Every job -- finetune-normal,
finetune-abnormal, train-detector -- is this loop; what differs is a *task*.

How a job plugs in
------------------
A task is a picklable object (a dataclass of its own settings) with these members; the harness
calls `validate` on the driver and the rest on every Ray Train worker:

    name: str                                    "finetune-normal": logs, job.json
    trains_in_bf16: bool                         False keeps the task in fp32 even on GPUs
                                                 (see "Precision" below)
    record() -> dict                             settings that define the model (job.json; a
                                                 resume into the same --out must match them)
    validate() -> None                           driver, before anything is written or Ray
                                                 starts: check the data and weights, raise
                                                 InvalidInputError / StorageError (one line)
    build(device) -> (module, trainable params)  the model on `device`, everything but the
                                                 returned parameters frozen (synth.training
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

and `TrainConfig` holds what every job shares. `train(config, task)` runs it and returns the
summary. The harness owns everything else:

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
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from cytosynth import storage
from cytosynth.storage.job import SUCCESS_NAME
from cytosynth.synth import InvalidInputError

from .job import USER_ERRORS, raised_error
from .train_config import OPTIMIZERS, PRECISIONS, TrainConfig

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
METRICS_NAME = "metrics.jsonl"
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


def train(config: TrainConfig, task: TrainingTask) -> dict[str, Any]:
    """Run (or resume) a training job on Ray Train; returns the summary written to `_SUCCESS`."""
    check_config(config)
    storage.ensure_writable(config.out)
    task.validate()
    # Before anything else looks at --out: a finished run with other settings is refused too.
    storage.write_job_json(
        config.out, {"job": task.name, **config.record(), "precision": "bf16" if uses_bf16(config, task) else "fp32", **task.record()}
    )
    if storage.is_complete(config.out):
        return read_summary(config.out)
    resume_step = latest_checkpoint(config.out)
    if resume_step and not config.resume:
        raise InvalidInputError(f"{config.out} holds a checkpoint at step {resume_step}; resume or use a new --out")
    if resume_step and resume_step >= config.steps:
        raise InvalidInputError(f"{config.out} is checkpointed at step {resume_step}, beyond --steps {config.steps}")

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from .ray_session import connect, forwarded_env

    started_ray = connect(config.ray_address, config.workers, 1.0 if config.use_gpu else 0.0)
    try:
        progress = Queue(actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "config": config,
                "task": task,
                "progress": progress,
                # Local workers reach the same storage as the driver (endpoint, credentials).
                "env": forwarded_env() if config.ray_address is None else {},
            },
            scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
            run_config=RunConfig(name=f"cytosynth-{task.name}-{os.getpid()}", failure_config=FailureConfig(0)),
        )
        with _ProgressBar(progress, config, resume_step, task.name):
            try:
                trainer.fit()
            except WorkerGroupError as err:
                rank, failure, cause = _worker_cause(err)
                if isinstance(cause, USER_ERRORS):
                    raise cause from None
                # Chained: the CLI's log then holds the worker's traceback (the wrapper's text).
                raise RuntimeError(f"{task.name} failed on rank {rank}: {_described(cause)}") from failure
        ray.kill(progress.actor)
    finally:
        if started_ray:
            ray.shutdown()
    return read_summary(config.out)


def check_config(config: TrainConfig) -> None:
    """Options that are wrong whatever the data: one-line InvalidInputError before any work."""
    for name in ("steps", "batch_size", "workers", "checkpoint_every", "sample_every", "log_every", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not config.lr > 0:
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


def _worker_cause(err: BaseException) -> tuple[int | str, BaseException, BaseException]:
    """(rank, failure as Ray reports it, the exception the worker's code raised): a worker's
    user error (InvalidInputError/StorageError) if any raised one, else the lowest rank's.

    Ray Train wraps what a worker raised (UserExceptionWithTraceback holds it as `_base_exc`,
    a RayTaskError as `cause`) and says only "[Rank 0 Error Snippet]" in its own message."""
    failures = sorted(getattr(err, "worker_failures", {}).items())
    causes = [(rank, failure, raised_error(failure)) for rank, failure in failures]
    for found in causes:
        if isinstance(found[2], USER_ERRORS):
            return found
    return causes[0] if causes else ("?", err, err)


def _described(err: BaseException) -> str:
    """`Type: first line` of an exception; for a traceback's text (the wrapper, when the worker's
    exception could not be unpickled), its last line, which names the exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class _ProgressBar:
    """A tqdm bar on the driver, fed by rank 0 through a Ray queue while `fit` blocks."""

    def __init__(self, queue: Any, config: TrainConfig, resume_step: int, name: str) -> None:
        self.queue = queue
        self.bar = tqdm(total=config.steps, initial=resume_step, unit="step", desc=name, disable=not config.progress)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            try:
                row = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue dies with Ray on a crash; the bar just stops
                return
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.2f}")

    def __enter__(self) -> "_ProgressBar":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


# --------------------------------------------------------------------------- worker


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the task's model, wrap it in DeepSpeed, train, checkpoint."""
    config: TrainConfig = loop_config["config"]
    task: TrainingTask = loop_config["task"]
    os.environ.update(loop_config["env"])
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read on DeepSpeed's first accelerator query
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    deepspeed.utils.logger.setLevel("WARNING")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    start_step = latest_checkpoint(config.out)
    seed = run_seed(config.seed, start_step)
    torch.manual_seed(seed + rank)  # noise and timesteps differ per worker

    module, trainable = task.build(get_device() if config.use_gpu else torch.device("cpu"))
    engine, *_ = deepspeed.initialize(
        model=_LossModule(task, module),
        optimizer=build_optimizer(config, trainable),
        model_parameters=trainable,
        config=deepspeed_config(config, world_size, uses_bf16(config, task)),
    )
    engine.checkpoint_engine = _safe_checkpoint_engine(engine)
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
            loop_config["progress"].put_nowait(row)
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


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl, kept by rank 0: rows up to the resumed step are kept, new ones get the next run number."""

    def __init__(self, out: str, start_step: int, flush_every: int) -> None:
        self.url = storage.join(out, METRICS_NAME)
        previous = read_metrics(out)
        self.rows = [r for r in previous if r["step"] <= start_step]
        self.run = max((r["run"] for r in previous), default=-1) + 1
        self.flush_every = flush_every

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({**row, "run": self.run, "time": round(time.time(), 3)})
        if row["step"] % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        storage.put_bytes(self.url, "".join(json.dumps(r) + "\n" for r in self.rows).encode())


def read_metrics(out: str) -> list[dict[str, Any]]:
    """The rows of `<out>/metrics.jsonl` ([] if there is none yet)."""
    url = storage.join(out, METRICS_NAME)
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.get_bytes(url).decode().splitlines() if line.strip()]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_url(out: str, step: int) -> str:
    return storage.join(out, CHECKPOINTS_DIR, f"step_{step:06d}")


def checkpoint_steps(out: str, complete_only: bool = True) -> list[int]:
    """Steps of the checkpoints under `out`, ascending; by default only those marked COMPLETE."""
    fs, path = storage.filesystem(storage.join(out, CHECKPOINTS_DIR))
    fs.invalidate_cache()
    found = sorted(int(p.rstrip("/").rsplit("step_", 1)[1]) for p in fs.glob(path + "/step_*"))
    if not complete_only:
        return found
    return [s for s in found if storage.exists(storage.join(checkpoint_url(out, s), COMPLETE_MARKER))]


def latest_checkpoint(out: str) -> int:
    """The step of the last complete checkpoint, 0 if there is none."""
    steps = checkpoint_steps(out)
    return steps[-1] if steps else 0


def remove_checkpoints(out: str, keep: int) -> None:
    """Keep the last `keep` complete checkpoints; remove older ones and every incomplete one.
    The marker goes first, so a half-removed checkpoint is never taken for a complete one."""
    complete = checkpoint_steps(out)
    keep_steps = set(complete[len(complete) - keep :] if keep else [])
    fs, _ = storage.filesystem(out)
    for step in checkpoint_steps(out, complete_only=False):
        if step in keep_steps:
            continue
        url = checkpoint_url(out, step)
        marker = storage.join(url, COMPLETE_MARKER)
        if storage.exists(marker):
            storage.retrying(lambda: fs.rm(storage.filesystem(marker)[1]), marker, action="remove")
        storage.retrying(lambda: fs.rm(storage.filesystem(url)[1], recursive=True), url, action="remove")


def save_checkpoint(engine: Any, out: str, step: int, rank: int, keep: int) -> None:
    """Collective: every rank saves its part locally and uploads it; then rank 0 marks it complete."""
    import torch.distributed as dist

    tag = f"step_{step:06d}"
    url = checkpoint_url(out, step)
    local = tempfile.mkdtemp(prefix="cytosynth-ckpt-")
    try:
        engine.save_checkpoint(local, tag=tag, client_state={"step": step}, exclude_frozen_parameters=True)
        names = sorted(os.listdir(os.path.join(local, tag)))
        for name in names:
            data = open(os.path.join(local, tag, name), "rb").read()
            storage.put_bytes(storage.join(url, name), data)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    every_rank: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every_rank, names)  # also the barrier: all uploads are done
    if rank == 0:
        files = sorted({n for part in every_rank for n in part})
        marker = {"step": step, "files": files, "world_size": len(every_rank), "time": time.time()}
        storage.put_bytes(storage.join(url, COMPLETE_MARKER), json.dumps(marker).encode())
        remove_checkpoints(out, keep)


def load_checkpoint(engine: Any, out: str, step: int) -> None:
    """Every rank fetches the checkpoint's files (ZeRO reads all partitions) and loads them."""
    tag = f"step_{step:06d}"
    url = checkpoint_url(out, step)
    names = checkpoint_file_names(storage.get_bytes(storage.join(url, COMPLETE_MARKER)), url)
    local = tempfile.mkdtemp(prefix="cytosynth-ckpt-")
    try:
        os.makedirs(os.path.join(local, tag))
        for name in names:
            with open(os.path.join(local, tag, name), "wb") as fh:
                fh.write(storage.get_bytes(storage.join(url, name)))
        loaded, client_state = engine.load_checkpoint(local, tag=tag, load_module_strict=False)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if loaded is None or client_state.get("step") != step:
        raise RuntimeError(f"checkpoint {url} did not load")


def checkpoint_file_names(marker: bytes, url: str) -> list[str]:
    """The file names a COMPLETE marker lists, each a plain name inside the checkpoint folder
    (DeepSpeed writes flat files): an absolute path, `..`, a folder or a backslash would make
    `load_checkpoint` write outside it. Anything else is a one-line StorageError."""
    try:
        names = json.loads(marker)["files"]
    except (ValueError, TypeError, KeyError) as err:
        raise storage.StorageError(f"checkpoint marker {storage.join(url, COMPLETE_MARKER)} is corrupt: {err}") from None
    if not isinstance(names, list):
        names = [names]
    for name in names:
        if not isinstance(name, str) or not _PLAIN_FILE_NAME.fullmatch(name):
            raise storage.StorageError(
                f"checkpoint marker {storage.join(url, COMPLETE_MARKER)} lists {str(name)[:80]!r}, "
                "not a plain file name inside the checkpoint folder"
            )
    return names


_PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,254}")


def _safe_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, reading with `weights_only=True`: no arbitrary pickle
    from storage, only tensors, containers and the few DeepSpeed types a checkpoint holds."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(engine._config)
