"""Where the training loop's metrics go: the `MetricsLogger` seam, and the history that becomes metrics.jsonl.

`run_steps` logs one row per log window (loss, lr, grad_norm, tokens_per_s) and one per evaluation; whoever runs
the loop chooses the loggers. The Ray Train worker passes `Loggers` of a `MetricsHistory` (carried in every
checkpoint as metrics.jsonl, read back on resume) and `chatforge.train.worker.TrainReports` (each step's rows as one
``ray.train.report``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one row of ``metrics`` (without ``step``) for optimizer step ``step``."""


class Loggers:
    """Several loggers as one, each getting every row in the order given."""

    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)


class MetricsHistory:
    """Every row logged so far, in memory; written as metrics.jsonl, one JSON object per row with ``step`` first."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows if rows is not None else []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.rows.append({"step": step, **metrics})

    def last(self, key: str) -> dict[str, Any]:
        """The last row that has ``key`` (empty when none has)."""
        return next((row for row in reversed(self.rows) if key in row), {})

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, METRICS_FILE), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)

    @classmethod
    def read(cls, directory: str) -> MetricsHistory:
        """The history a checkpoint directory holds (empty when it holds none)."""
        path = os.path.join(directory, METRICS_FILE)
        if not os.path.exists(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            return cls([json.loads(line) for line in f if line.strip()])
