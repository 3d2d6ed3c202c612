"""Readers over other libraries, for users' own training code: a webdataset pipeline that streams
from any fsspec URL (``s3://`` with an endpoint included), and a Ray Dataset with decoded columns.

Thin on purpose: the shard list is ``committed_shard_urls`` (only committed shards, one-line errors),
opening goes through fsspec (webdataset itself has no ``s3://`` handler), and the rest is the
library's own stages. Importing this module imports webdataset (hence torch); Ray is imported
inside ``ray_dataset`` only, as storage never imports Ray otherwise.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .images import decode_image
from .jsonio import parse_json
from .reader import IMAGE_EXTENSIONS, committed_shard_urls, open_shards, shard_urls
from .urls import filesystem

if TYPE_CHECKING:
    import ray.data

__all__ = ["RAY_COLUMNS", "ray_dataset", "webdataset_pipeline"]

RAY_COLUMNS = ("key", "tile_index", "image", "image_format", "width", "height", "boxes", "labels",
               "category_ids", "normal_boxes")


def _shard_list(url: str | list[str]) -> list[str]:
    """An output's committed shards (strict), or the shards a pattern / list names."""
    if isinstance(url, (list, tuple)):
        return [s for u in url for s in shard_urls(u)]
    if str(url).endswith(".tar") or any(c in str(url) for c in "*?[{"):
        return shard_urls(url)
    return committed_shard_urls(url)


def webdataset_pipeline(
    url: str | list[str],
    *,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    decode: str | None = "rgb8",
) -> wds.DataPipeline:
    """A ``wds.DataPipeline`` of the samples of ``url`` (an output, local or any fsspec URL; or a
    shard pattern or list), split across torch.distributed ranks and DataLoader workers.

    Shard shuffle is ``detshuffle`` with ``seed``: every rank draws the same shard order (a new one
    each pass), which ``split_by_node`` needs to hand each rank different shards; samples are then
    shuffled in a buffer of ``shuffle_buffer``, seeded too: the same ``seed`` gives the same order.
    A pass counts per pipeline object: under a DataLoader with workers, ``persistent_workers=True``
    keeps the count (otherwise every epoch starts from a fresh copy and repeats the first order). ``decode`` is a webdataset decoder spec (``"rgb8"``:
    HxWx3 uint8 arrays; ``"torchrgb"``: CHW float tensors; None: raw bytes); ``json`` is always a dict.
    Like any webdataset split, a reader gets no shard when there are fewer shards than
    ranks x workers: use ``ShardDetectionDataset`` for exactly-once epochs over any shard count.
    """
    shards = _shard_list(url)
    stages: list[Any] = [wds.SimpleShardList(shards)]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=len(shards), initial=len(shards), seed=seed))
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        open_shards,
        tar_file_expander,
        group_by_keys,
    ]
    if shuffle:
        stages.append(_SampleShuffle(shuffle_buffer, seed))
    if decode:
        stages.append(wds.decode(decode))
    else:
        stages.append(wds.map(_json_decoded))
    return wds.DataPipeline(*stages)


class _SampleShuffle:
    """webdataset's buffer shuffle, seeded by (seed, pass, rank, worker): ``wds.shuffle`` alone
    seeds itself from the pid and the clock, so the same ``seed`` would not give the same order."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.passes = bufsize, seed, -1

    def __call__(self, src: Any) -> Any:
        self.passes += 1  # a new order each pass, as detshuffle's epoch
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}/{self.passes}/{rank}/{worker}")  # str seeds are stable across runs
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _json_decoded(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "json": parse_json(sample["json"], f"{sample['__key__']}.json")}


def ray_dataset(url: str) -> "ray.data.Dataset":
    """The committed samples of the output ``url`` (local or any fsspec URL, ``s3://`` endpoints
    from $AWS_ENDPOINT_URL or fsspec's configuration) as a Ray Dataset with columns ``RAY_COLUMNS``:
    ``image`` decoded (HxWx3 uint8, from png, jpg or webp), ``boxes`` / ``normal_boxes`` as [N, 4]
    int32 xyxy, ``labels`` the class names and ``category_ids`` their ids (ASC-US 1 ... HSIL 4)."""
    import ray.data  # storage never imports Ray at module level
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    shards = committed_shard_urls(url)
    fs, _ = filesystem(url)
    paths = [filesystem(shard)[1] for shard in shards]
    raw = ray.data.read_webdataset(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), decoder=None)
    return raw.map(_ray_row)


def _ray_row(raw: dict[str, Any]) -> dict[str, Any]:
    ext = next(e for e in IMAGE_EXTENSIONS if raw.get(e) is not None)
    ann = raw["json"] if isinstance(raw["json"], dict) else parse_json(raw["json"], f"{raw['__key__']}.json")
    return {
        "key": str(raw["__key__"]),
        "tile_index": int(ann["tile_index"]),
        "image": decode_image(raw[ext]),
        "image_format": ext,
        "width": int(ann["width"]),
        "height": int(ann["height"]),
        "boxes": np.asarray(ann["boxes"], np.int32).reshape(-1, 4),
        "labels": list(ann["labels"]),
        "category_ids": np.asarray(ann["category_ids"], np.int64),
        "normal_boxes": np.asarray(ann.get("normal_boxes", []), np.int32).reshape(-1, 4),
    }
