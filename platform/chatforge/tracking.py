"""Experiment tracking with MLflow: one run per command, with the lineage from data to model to evaluation.

Each command (curate, train, tune with a nested run per trial, eval) opens one MLflow run (`command_run`) that
holds the resolved spec as params (and as `spec.yaml`), metrics per step, its outputs as artifacts, and the data
it read as an MLflow dataset input whose digest is the curation fingerprint. The run id is also written into the
command's own output (`manifest.json`, `training.json`, `eval.json` under ``"tracking"``), so `chatforge lineage`
answers from the files alone and MLflow answers the same question from the runs' tags and inputs.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store at
``runs/mlflow.db`` (MLflow 3 refuses its old file store unless told otherwise). On a cluster, point every node at a
tracking server (``mlflow server``): a SQLite path is local to one machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from chatforge.config import Spec, TrackingSpec

log = logging.getLogger("chatforge.tracking")

DEFAULT_STORE = os.path.join("runs", "mlflow.db")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
COMMAND_TAG = "chatforge.command"
OUTPUT_TAG = "chatforge.output"
FINGERPRINT_TAG = "chatforge.data_fingerprint"


def tracking_uri(spec: TrackingSpec) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store under runs/ (absolute, so every
    process of a local Ray finds the same file)."""
    if spec.uri:
        return spec.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.abspath(DEFAULT_STORE)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow params: dotted keys, JSON-ish values, lists kept whole (cut to MLflow's limit)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    text = json.dumps(tree) if isinstance(tree, list | dict) or tree is None else str(tree)
    return {prefix[:-1]: text[:MAX_PARAM_CHARS]}


@dataclass
class TrackedRun:
    """The MLflow run of one command; every method is a no-op when tracking is off (``run_id`` None)."""

    run_id: str | None
    uri: str | None = None
    experiment_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def record(self) -> dict[str, str] | None:
        """What a command writes into its own output so the files name their run."""
        return {"run_id": self.run_id, "uri": self.uri, "experiment_id": self.experiment_id} if self.enabled else None

    def metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            mlflow.MlflowClient(self.uri).log_batch(
                self.run_id, metrics=[_metric(k, v, step) for k, v in numbers.items()]
            )

    def artifact(self, path: str, folder: str | None = None) -> None:
        if not self.enabled or not os.path.exists(path):
            return
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        if os.path.isdir(path):
            client.log_artifacts(self.run_id, path, folder)
        else:
            client.log_artifact(self.run_id, path, folder)

    def document(self, content: dict[str, Any], name: str) -> None:
        """``content`` as the JSON artifact ``name`` (for what exists only in memory or in an object store)."""
        if not self.enabled:
            return
        import mlflow

        mlflow.MlflowClient(self.uri).log_dict(self.run_id, content, name)

    def dataset(self, data_dir: str, fingerprint: str | None, name: str, context: str) -> None:
        """The data a command read, as an MLflow dataset input; its digest is the curation fingerprint."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path matches two equivalent source kinds; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(data_dir)
        dataset = MetaDataset(source=source, name=name, digest=(fingerprint or "unknown")[:36])
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError("TrackedRun.dataset logs to the active run: call it inside its command_run block")
        mlflow.log_input(dataset, context=context)
        if fingerprint:
            self.tags({f"{FINGERPRINT_TAG}.{context}": fingerprint})

    def tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        for key, value in tags.items():
            client.set_tag(self.run_id, key, str(value))


class RunMetrics:
    """A `chatforge.train.metrics.MetricsLogger` that sends each row to the command's MLflow run, from rank 0.

    Logging goes from the worker that has the rows, as it trains, so the run's curves grow while it runs (Ray's
    ``setup_mlflow`` would open a second run; this one writes to the command's own). A tracking store that fails
    costs a warning and the rest of the curve, never the training."""

    def __init__(self, run: TrackedRun) -> None:
        self.run, self.failed = run, False

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self.run.metrics(metrics, step)
        except Exception as err:  # the store is down or refuses: training goes on without it
            self.failed = True
            log.warning("MLflow logging stopped at step %d (%s: %s); training goes on", step, type(err).__name__, err)


def _metric(key: str, value: float, step: int | None):
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=int(time.time() * 1000), step=step or 0)


@contextlib.contextmanager
def command_run(
    spec: Spec, command: str, output: str | None = None, parent: TrackedRun | None = None, name: str | None = None
) -> Iterator[TrackedRun]:
    """One MLflow run for ``command``, nested under ``parent`` if given, with the spec as params and spec.yaml.

    The run is MLflow's active run inside the block, and ends FINISHED, or FAILED when the block raises (the error
    propagates). With tracking off, the run is a no-op `TrackedRun(None)`."""
    if not spec.tracking.enabled:
        yield TrackedRun(None)
        return
    import mlflow
    from mlflow.entities import Param

    uri = tracking_uri(spec.tracking)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.tracking.experiment)
    tags = {COMMAND_TAG: command}
    if output:
        tags[OUTPUT_TAG] = os.path.abspath(output)
    parent_id = parent.run_id if parent is not None and parent.enabled else None
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name or f"{command}-{spec.name}",
        tags=tags,
        nested=parent_id is not None,
        parent_run_id=parent_id,
    ) as active:
        run = TrackedRun(active.info.run_id, uri, experiment_id)
        items = sorted(flatten(spec.model_dump(mode="json")).items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "spec.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(spec.model_dump(mode="json"), f, sort_keys=False)
            client.log_artifact(run.run_id, path)
        yield run  # an exception here ends the run FAILED (mlflow.start_run's exit), then propagates


def register_model(run: TrackedRun, model_dir: str, name: str, alias: str = "candidate") -> str | None:
    """Register ``model_dir`` (logged as the run's ``model`` artifact) as a new version of ``name`` and point
    ``alias`` at it (aliases, not the deprecated stages); returns the version, None with tracking off."""
    if not run.enabled:
        return None
    import mlflow

    client = mlflow.MlflowClient(run.uri)
    run.artifact(model_dir, "model")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # already registered
        client.create_registered_model(name)
    source = f"runs:/{run.run_id}/model"
    version = client.create_model_version(name, source, run_id=run.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
