"""metrics.jsonl of a training job: one JSON row per step, rewritten whole (stores cannot append)."""

from __future__ import annotations

import json
import time
from typing import Any

from cytosynth import storage

METRICS_NAME = "metrics.jsonl"


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
