"""Where the training loop's metrics go: the `MetricsLogger` seam, and the history that becomes metrics.jsonl.

`run_steps` logs one row per log window (loss, lr, grad_norm, tokens_per_s) and one per evaluation; whoever runs
the loop chooses the loggers. The Ray Train worker passes `Loggers` of a `MetricsHistory` (carried in every
checkpoint as metrics.jsonl, read back on resume), `chatforge.train.worker.TrainReports` (each step's rows as one
``ray.train.report``) and, on rank 0, `RayMetrics` (Ray metrics for the dashboard and Grafana) and the MLflow run's
`chatforge.tracking.RunMetrics`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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


# log row key -> Ray gauge: what the Ray dashboard's metrics view and Grafana show while a run trains
RAY_GAUGES = {
    "loss": ("chatforge_train_loss", "training loss, mean over the last log window"),
    "eval_loss": ("chatforge_train_eval_loss", "validation loss at the last evaluation"),
    "tokens_per_s": ("chatforge_train_tokens_per_second", "training tokens/s of all workers over the last window"),
    "lr": ("chatforge_train_learning_rate", "learning rate at the last logged step"),
}


class RayMetrics:
    """A `MetricsLogger` that exports each row as Ray metrics (``ray.util.metrics``, tagged ``run``), as serving's
    are: the Ray dashboard, Prometheus (with Ray's ``ray_`` prefix) and Grafana see training beside serving. Rank 0
    logs; ``start_step`` is where a resumed run starts counting steps."""

    def __init__(self, run: str, start_step: int = 0) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {
            key: Gauge(name, description=description, tag_keys=("run",))
            for key, (name, description) in RAY_GAUGES.items()
        }
        self.steps = Counter("chatforge_train_steps_total", description="optimizer steps taken", tag_keys=("run",))
        self.step = start_step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if isinstance(value, int | float):
                gauge.set(float(value), tags=self.tags)
        if step > self.step:
            self.steps.inc(step - self.step, tags=self.tags)
            self.step = step


def metrics_run_name(output: str) -> str:
    """A run's ``run`` tag: the last two parts of its output dir (``quickstart/train``), short and stable."""
    parts = Path(output).resolve().parts
    return "/".join(parts[-2:])
