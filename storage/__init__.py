"""Bytes in and out: fsspec URLs (local, ``s3://``, ``memory://``), WebDataset shards and their
commit protocol, manifests, COCO export and previews (docs/design.md §1, §3-4).

Works over plain data (dicts, numpy arrays, bytes); never imports Ray or ``cytosynth.synth``.
The detector loader (``storage.loader``) needs torch, so its names load on first use.
"""

import importlib

from .annotations import MANIFEST_FIELDS, normalize_annotation, sample_key
from .classes import (
    CATEGORY_IDS,
    CLASSES,
    LABEL_SETS,
    NORMAL_CATEGORY_ID,
    NORMAL_LABEL,
    category_id,
    label_categories,
    labelled_boxes,
)
from .coco import ANNOTATIONS_NAME, CATEGORIES, coco_categories, export_coco, to_coco, write_coco
from .errors import StorageError
from .images import IMAGE_FORMATS, LOSSLESS_FORMATS, decode_image, encode_image, image_extension
from .integrity import damaged_shards, manifest_problem, shard_problem, tar_sha256, tar_sizes, uncommit
from .job import (
    check_not_foreign,
    config_sha256,
    ensure_writable,
    is_complete,
    is_secret_name,
    job_config_sha256,
    read_job_json,
    redact,
    write_job_json,
    write_success,
)
from .manifest import MANIFEST_NAME, MANIFEST_SCHEMA, manifest_rows, read_manifest, write_manifest
from .objects import create_bytes, delete, exists, get_bytes, get_range, list_names, put_bytes, remove_temp_files
from .preview import CLASS_COLORS, contact_sheet, write_preview
from .imagesets import IMAGE_SUFFIXES, ImageSet, list_image_set, read_image
from .imageindex import REAL_INDEX_NAME, ImageIndex, IndexEntry, index_image_set, read_image_index, read_indexed_image, real_index_url, write_image_index
from .reader import committed_shard_urls, decode_sample, open_shard, open_shards, read_samples, shard_urls
from .retry import DEFAULT_RETRY, Retry, is_transient, retrying
from .shards import (
    SHARDS_DIR,
    STATS_DIR,
    ShardWriter,
    check_marker_config,
    committed_shards,
    iter_shard_stats,
    marker_of,
    marker_url,
    read_shard_stats,
    refuse_old_layout,
    shard_name,
    shard_url,
    stats_url,
)
from .tars import iter_tar_samples, tar_bytes
from .urls import filesystem, join

# Exported lazily (PEP 562): `import cytosynth.storage` must not pay for importing torch
# (the detector loader, webdataset pipelines); Ray is imported only inside `ray_dataset`.
_LOADER_NAMES = (
    "ShardDetectionDataset", "coco_detection_samples", "collate_detection", "count_samples",
    "detection_categories", "detection_loader", "detection_target", "resolve_shards",
    "shard_detection_samples", "split_shards", "to_detection_input",
)
_PIPELINE_NAMES = ("RAY_COLUMNS", "ray_dataset", "webdataset_pipeline")
_LAZY = {**dict.fromkeys(_LOADER_NAMES, ".loader"), **dict.fromkeys(_PIPELINE_NAMES, ".pipelines")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LOADER_NAMES, *_PIPELINE_NAMES, "check_marker_config", "config_sha256", "create_bytes", "damaged_shards",
    "delete", "job_config_sha256", "manifest_problem", "shard_problem", "tar_sha256", "tar_sizes", "uncommit", "ANNOTATIONS_NAME", "LABEL_SETS", "NORMAL_CATEGORY_ID", "coco_categories",
    "export_coco", "label_categories", "labelled_boxes",
    "IMAGE_SUFFIXES", "ImageSet", "list_image_set", "read_image",
    "ImageIndex", "IndexEntry", "index_image_set", "read_image_index", "read_indexed_image", "write_image_index", "get_range",
    "REAL_INDEX_NAME", "real_index_url",
    "CATEGORIES", "CATEGORY_IDS", "CLASSES", "CLASS_COLORS", "DEFAULT_RETRY", "IMAGE_FORMATS",
    "LOSSLESS_FORMATS", "MANIFEST_FIELDS", "MANIFEST_NAME", "MANIFEST_SCHEMA", "NORMAL_LABEL", "SHARDS_DIR", "STATS_DIR",
    "Retry", "ShardWriter", "StorageError", "category_id", "check_not_foreign", "committed_shard_urls", "committed_shards", "contact_sheet", "decode_image", "decode_sample",
    "encode_image", "ensure_writable", "image_extension", "marker_of", "marker_url", "refuse_old_layout", "exists", "filesystem", "get_bytes", "is_complete", "is_secret_name", "is_transient",
    "iter_shard_stats", "iter_tar_samples", "join", "list_names", "manifest_rows", "normalize_annotation",
    "open_shard", "open_shards", "put_bytes", "read_job_json", "read_manifest", "read_samples",
    "read_shard_stats", "redact", "retrying", "sample_key", "shard_name", "shard_url", "shard_urls",
    "stats_url", "tar_bytes", "to_coco", "write_coco", "write_job_json", "write_manifest",
    "write_preview", "write_success",
]
