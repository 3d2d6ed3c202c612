"""Training on Ray Train: the ranks of `training.loop` as the workers of a `TorchTrainer`.

The driver checks and claims --out (`training.loop.start_job`), starts (or joins) Ray, and shows
rank 0's progress from a Ray queue while `fit` blocks; a rank's user error reaches the CLI as it
was raised (`failures.raised_error`), anything else as one line naming the rank. One rank with
no --ray-address needs no Ray: it trains in this process (`training.loop.train_in_process`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from cytosynth.training.loop import StepBar, TrainingTask, read_summary, start_job, train_in_process, train_rank
from cytosynth.training.train_config import TrainConfig

from .failures import USER_ERRORS, raised_error


def train(config: TrainConfig, task: TrainingTask) -> dict[str, Any]:
    """Run (or resume) a training job on `config.workers` ranks; returns the summary written to
    `_SUCCESS`."""
    config, resume_step = start_job(config, task)
    if resume_step is None:
        return read_summary(config.out)
    if config.workers == 1 and config.ray_address is None:
        train_in_process(config, task, resume_step)  # Ray Train would only add its start-up
    else:
        _train_on_ray(config, task, resume_step)
    return read_summary(config.out)


def _train_on_ray(config: TrainConfig, task: TrainingTask, resume_step: int) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from .ray_session import connect, forwarded_env

    started_ray = connect(config.ray_address, config.workers, 1.0 if config.use_gpu else 0.0)
    try:
        progress = Queue(actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            _rank_on_ray,
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
    """The driver's StepBar, fed by rank 0 through a Ray queue while `fit` blocks."""

    def __init__(self, queue: Any, config: TrainConfig, resume_step: int, name: str) -> None:
        self.queue = queue
        self.bar = StepBar(config, resume_step, name)
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
            self.bar.show(row)

    def __enter__(self) -> "_ProgressBar":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def _rank_on_ray(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its environment, then `train_rank` with Ray Train's rank and device."""
    config: TrainConfig = loop_config["config"]
    os.environ.update(loop_config["env"])
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read on DeepSpeed's first accelerator query
    import ray.train
    import torch
    from ray.train.torch import get_device

    context = ray.train.get_context()
    device = get_device() if config.use_gpu else torch.device("cpu")
    train_rank(config, loop_config["task"], context.get_world_rank(), context.get_world_size(), device,
               report=loop_config["progress"].put_nowait)
