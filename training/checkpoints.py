"""The training checkpoint protocol: every rank uploads its DeepSpeed files, rank 0 commits.

    <out>/checkpoints/step_000500/<files>    each rank's own DeepSpeed files
    <out>/checkpoints/step_000500/COMPLETE   rank 0, once every rank's files are up: the commit

A checkpoint without COMPLETE is never resumed from and is removed; the marker lists the files,
which must be plain names inside the folder; files are read with `torch.load(weights_only=True)`
(DeepSpeed's own loader unpickles).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import torch

from cytosynth import storage

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


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


def safe_checkpoint_engine(engine: Any) -> Any:
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
