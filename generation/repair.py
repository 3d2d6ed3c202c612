"""`cytosynth verify`: check a generate output shard by shard, and repair it with its own job.

Every shard of the job's layout must be committed, its tar present with the size and SHA-256 its
marker records, its marker must name the job's config, and `manifest.parquet` must hold the
markers' rows. Repair takes the bad shards out (`storage.uncommit`) and runs the job again from
the config job.json records, through the same resume path as `generate`: only those shards are
made, then the manifest, preview and `_SUCCESS` are rebuilt.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from cytosynth import storage
from cytosynth.storage.errors import redact_url
from cytosynth.storage.job import REDACTED, SUCCESS_NAME
from cytosynth.synth import InvalidInputError

from .generate_config import GenerateConfig, JobLayout, job_config
from .runner import Runtime, finalize_job, read_plan, run_local, validate_config


@dataclass
class VerifyReport:
    """What `verify_job` found: shard index -> problem, the manifest's problem, completeness."""

    out: str
    shards: int
    problems: dict[int, str] = field(default_factory=dict)
    manifest: str | None = None
    complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and self.manifest is None and self.complete


def recorded_job(out: str) -> tuple[dict[str, Any], JobLayout]:
    """job.json's config and the shard layout it implies; one line if `out` is no generate output."""
    record = storage.read_job_json(out)
    if record is None:
        raise storage.StorageError(f"{redact_url(out)} is not a cytosynth output (no job.json)")
    config = record["config"]
    if "job" in config or not all(isinstance(config.get(k), int) and config[k] > 0 for k in ("num_tiles", "tiles_per_shard")):
        raise InvalidInputError(f"{redact_url(out)} is not a `cytosynth generate` output")
    return config, JobLayout(config["num_tiles"], config["tiles_per_shard"])


def check_job(out: str) -> VerifyReport:
    """Check every shard of the job at `out` (reads every tar) and its manifest."""
    config, layout = recorded_job(out)
    identity = storage.config_sha256(config)
    report = VerifyReport(out, layout.num_shards)
    report.problems = storage.damaged_shards(out, hash_tars=True, config_sha256=identity, strict=False)
    committed = storage.committed_shards(out)
    for index in range(layout.num_shards):
        if index not in committed:
            report.problems[index] = "not committed"
    for index in committed - set(range(layout.num_shards)):
        report.problems[index] = f"not a shard of this job (it has {layout.num_shards})"
    if not report.problems:
        report.manifest = storage.manifest_problem(out, config_sha256=identity)
    elif not storage.exists(storage.join(out, storage.MANIFEST_NAME)):
        report.manifest = "it is missing"  # its rows are checked once the shards are whole
    report.problems = dict(sorted(report.problems.items()))
    report.complete = storage.is_complete(out)
    return report


def config_for_repair(out: str, plan: str | None) -> GenerateConfig:
    """The GenerateConfig job.json records, checked to give back the very same config hash.

    job.json keeps a plan by its hash only: a job made with a plan is repaired with `plan`, its
    text. A value redacted in job.json (a URL's credentials) cannot be used again.
    """
    recorded, layout = recorded_job(out)
    redacted = sorted(k for k, v in recorded.items() if k != "plan" and isinstance(v, str) and (v == REDACTED or v != redact_url(v) or "***@" in v))
    if redacted:
        raise InvalidInputError(
            f"cannot repair {redact_url(out)}: job.json holds {', '.join(redacted)} redacted (credentials are never "
            "recorded); pass credentials through the environment, not in URLs"
        )
    if recorded.get("plan") is not None:
        if plan is None:
            raise InvalidInputError(f"{redact_url(out)} was made with a plan: pass it again with --plan FILE")
        digest = "sha256:" + hashlib.sha256(plan.encode()).hexdigest()[:16]
        if digest != recorded["plan"]:
            raise InvalidInputError(f"--plan is not the plan {redact_url(out)} was made with ({recorded['plan']})")
    config = GenerateConfig.from_record(out, recorded, plan if recorded.get("plan") is not None else None)
    rebuilt = job_config(config, layout, recorded.get("models", {}))
    if storage.config_sha256(rebuilt) != storage.config_sha256(recorded):
        changed = sorted(k for k in set(rebuilt) | set(recorded) if storage.redact(rebuilt.get(k)) != recorded.get(k))
        raise InvalidInputError(
            f"cannot repair {redact_url(out)}: its job.json's config is not one this cytosynth makes "
            f"(differs in: {', '.join(changed) or 'config'})"
        )
    return config


def repair_job(out: str, report: VerifyReport, runtime: Runtime, plan: str | None = None) -> VerifyReport:
    """Make the shards `report` found bad again with the job's recorded config, rebuild the
    manifest, preview and `_SUCCESS`; return a fresh check of the result."""
    if report.ok:
        return report
    config = config_for_repair(out, plan)
    layout = validate_config(config, read_plan(config))  # the inputs (real tiles, plan) must still be there and valid
    storage.uncommit(out, [i for i, p in report.problems.items() if p != "not committed"])
    storage.delete(storage.join(out, SUCCESS_NAME))  # the dataset's files are rebuilt
    start = time.perf_counter()
    if report.problems:
        run_local(config, runtime)  # generate's own resume path: the missing shards only
    else:
        finalize_job(config, layout, time.perf_counter() - start)
    return check_job(out)
