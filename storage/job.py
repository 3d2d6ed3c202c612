"""Job-level markers: ``job.json`` (written first), ``_SUCCESS`` (written last), and a fail-fast
writability probe. Credentials never reach these files: secret-looking keys are redacted."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import posixpath
import re
import uuid
from typing import Any, Mapping

from .errors import StorageError, describe, redact_url
from .jsonio import json_bytes, parse_json, to_plain
from .objects import TEMP_PREFIX, create_bytes, exists, get_bytes, put_bytes, write_whole
from .retry import retrying
from .shards import committed_shards
from .urls import S3_PROTOCOLS, filesystem, join, protocol

JOB_NAME = "job.json"
SUCCESS_NAME = "_SUCCESS"
REDACTED = "<redacted>"
# Key names that hold credentials in fsspec/s3fs/botocore options and typical configs.
_SECRET_KEY = re.compile(r"secret|passw|token|credential|access_key|(^|_)key$|^auth", re.IGNORECASE)
_VERSIONED = ("cytosynth", "torch", "diffusers", "numpy", "fsspec", "s3fs", "webdataset", "pyarrow")


def is_secret_name(name: str) -> bool:
    """True for a key or variable name that holds credentials (``secret``, ``AWS_SESSION_TOKEN``...)."""
    return bool(_SECRET_KEY.search(str(name)))


def redact(obj: Any) -> Any:
    """Plain-JSON copy of ``obj`` with secret-looking keys' values and URL passwords replaced."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_name(k) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


def software_versions() -> dict[str, str | None]:
    """Versions of Python and the packages a dataset's bytes depend on (without importing them)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "config"]


def config_sha256(config: Mapping[str, Any]) -> str:
    """The job's identity: SHA-256 of its config as job.json records it (redacted, plain JSON).
    Every shard marker carries it, so a shard made under another config is never taken as ours."""
    return hashlib.sha256(json_bytes(to_plain(redact(config)))).hexdigest()


def job_config_sha256(out_url: str) -> str | None:
    """``config_sha256`` of the job recorded under ``out_url``; None if it has no job.json."""
    record = read_job_json(out_url)
    return None if record is None else config_sha256(record["config"])


def read_job_json(out_url: str) -> dict[str, Any] | None:
    """The job record under ``out_url``, or None if there is none yet."""
    url = join(out_url, JOB_NAME)
    if not exists(url):
        return None
    try:
        record = parse_json(get_bytes(url), redact_url(url))
    except ValueError as err:
        raise StorageError(f"{err}; it was not written by cytosynth, or is damaged: use a new --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise StorageError(f"{redact_url(url)} is not a cytosynth job record (no \"config\"); use a new --out")
    return record


# Names cytosynth itself may leave in an output before job.json: probes and temp files.
_OWN_LEFTOVERS = (".cytosynth-probe-", TEMP_PREFIX)


def check_not_foreign(out_url: str) -> None:
    """Refuse, before anything is written, an ``out_url`` that holds anything but a cytosynth
    output: a non-empty folder without ``job.json`` (files of someone else, a junk shard)."""
    if exists(join(out_url, JOB_NAME)):
        return
    fs, path = filesystem(out_url)

    def entries() -> list[str]:
        fs.invalidate_cache(path)
        try:
            return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    found = [n for n in retrying(entries, out_url, action="list") if not n.startswith(_OWN_LEFTOVERS)]
    if found:
        raise StorageError(
            f"output {redact_url(out_url)} is not empty and holds no {JOB_NAME} (e.g. {found[0]!r}): "
            "it is not a cytosynth output; use a new --out"
        )


def write_job_json(
    out_url: str,
    config: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Claim ``out_url`` for this job: write ``job.json`` (config, software versions, ``extra``
    such as model fingerprints) first.

    The claim is atomic (``create_bytes``: of two drivers racing, exactly one writes). If
    ``out_url`` already holds a job.json with the same config, it is kept (a resume); with a
    different config, StorageError: two jobs must never mix shards in one output.
    """
    config = to_plain(redact(config))
    record = {**to_plain(redact(extra or {})), "config": config, "versions": software_versions()}
    url = join(out_url, JOB_NAME)
    created = create_bytes(url, json_bytes(record, indent=2))
    # Read back even after a create: a store that ignores If-None-Match (some S3-compatible
    # ones) lets a racing driver overwrite the claim; this catches it at least where it is seen.
    existing = read_job_json(out_url)
    if existing is None:  # deleted between our claim and the read: it cannot be matched, so refuse
        raise StorageError(f"{redact_url(url)} appeared and vanished while this job claimed {redact_url(out_url)}; retry")
    changed = _differences(existing.get("config"), config)
    if changed:
        raise StorageError(
            f"{redact_url(url)} was written by a different job config; use a new --out "
            f"(differs in: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"
        )
    return record if created else existing


def write_success(
    out_url: str,
    summary: Mapping[str, Any],
    *,
    expected_shards: int | None = None,
) -> None:
    """Write ``_SUCCESS`` (the job summary) last; with ``expected_shards``, first check that
    shards ``0..expected_shards-1`` are all committed (StorageError otherwise)."""
    if expected_shards is not None:
        missing = sorted(set(range(expected_shards)) - committed_shards(out_url))
        if missing:
            raise StorageError(
                f"cannot mark {redact_url(out_url)} complete: {len(missing)} of {expected_shards} shards "
                f"are not committed (first: {missing[0]})"
            )
    put_bytes(join(out_url, SUCCESS_NAME), json_bytes(redact(summary), indent=2))


def is_complete(out_url: str) -> bool:
    """True once ``_SUCCESS`` exists, i.e. the dataset is whole."""
    return exists(join(out_url, SUCCESS_NAME))


def _probe_options(url: str, timeout: float) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if protocol(url) in S3_PROTOCOLS:
        # Short timeouts and a single botocore attempt: an unreachable endpoint must fail in
        # seconds, not after botocore's and s3fs' layered retries (about a minute).
        config = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}
        options["config_kwargs"] = config
    # A private instance: the probe's settings must not leak into the job's cached filesystem.
    options["skip_instance_cache"] = True
    return options


def ensure_writable(out_url: str, *, timeout: float = 5.0) -> None:
    """Fail fast, before any work, if ``out_url`` cannot be written: write and delete a probe.

    Raises StorageError (one line) for an unreachable endpoint, a missing bucket, no permission or
    a local path that is not a writable folder.
    """
    fs, path = filesystem(out_url, **_probe_options(out_url, timeout))
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs' own retry loop on top of botocore's; one try is enough for a probe
    probe = join(path, f".cytosynth-probe-{uuid.uuid4().hex}")
    try:
        write_whole(fs, probe, b"")
        fs.rm_file(probe)
    except Exception as exc:
        raise StorageError(f"output {redact_url(out_url)} is not writable: {describe(exc)}") from exc
