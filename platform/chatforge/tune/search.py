"""`chatforge tune`: a hyperparameter search on Ray Tune whose trials are `chatforge train` runs.

The data is tokenized and packed once, in the driver, and every trial trains on the same Ray Datasets. A trial is a
function trainable that builds the same Ray Train `TorchTrainer` as `chatforge train` (Train V2: the trainable calls
the trainer) from its own spec, the search's spec with the trial's values set; a callback forwards rank 0's
evaluations to Tune, so the ASHA scheduler can stop a trial whose ``eval_loss`` lags, in training steps.

OUTPUT/trials.csv    one row per trial: its values, eval_loss (its best), steps, status, error
OUTPUT/best.json     the best trial's values, eval_loss, and its exported model (copied to OUTPUT/best/model)
OUTPUT/search/       Ray Tune's experiment dir (what `tune.resume: true` restores)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from chatforge.config import Spec
from chatforge.files import write_atomic
from chatforge.runtime import cause_line
from chatforge.tracking import TrackedRun, tracking_uri
from chatforge.tune.space import check_space, param_space, trial_spec

METRIC, MODE = "eval_loss", "min"
SEARCH_DIR = "search"
TRIAL_HEAD_CPUS = 0.01  # the trial function only waits on its trainer; its workers hold the CPUs


class StateApiMissing(RuntimeError):
    """Ray runs without its state API (the dashboard), which Ray Train needs to free a stopped trial's workers."""


@dataclass
class SearchResult:
    output: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None


class EvalReports(TuneReportCallback):
    """Forwards to Tune only the reports that carry an evaluation, so every Tune result has ``eval_loss`` (ASHA
    compares trials on it) and ``step`` (ASHA's clock)."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class TrialEvents(Callback):
    """Hands each trial's results and end to a function in the driver (the CLI's live table).

    Tune pickles its callbacks with the experiment's state; the function (which may hold a console and its locks)
    stays out of the pickle, so a restored search reports to nothing until it is given a new one."""

    def __init__(self, on_trial) -> None:
        self.on_trial = on_trial

    def __getstate__(self) -> dict:
        return {"on_trial": lambda *event: None}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.on_trial(trial.trial_id, "result", result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.on_trial(trial.trial_id, "complete", trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial(trial.trial_id, "error", trial.last_result)


def run_search(spec: Spec, progress=None, tracked: TrackedRun | None = None, on_trial=None) -> SearchResult:
    """Run the search of ``spec.tune`` over ``spec``'s training; Ray must already be initialised.

    ``progress(message)`` hears each phase; ``on_trial(trial_id, event, result)`` each trial's evaluations
    (event "result") and its end ("complete" or "error"), in the driver; ``tracked`` is the search's MLflow run,
    under which each trial logs a nested one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from chatforge.train.data import prepare_training_data
    from chatforge.train.trainer import presplit_data_config

    say = progress or (lambda message: None)
    check_space(spec)
    require_state_api()
    output = os.path.abspath(spec.tune.output)
    search_dir = os.path.join(output, SEARCH_DIR)
    os.makedirs(output, exist_ok=True)
    say("tokenizing and packing (once for every trial)")
    prepared = prepare_training_data(spec, progress=say)
    # cut the train set into each trial's worker shards here, while the CPUs are free: inside a trial the other
    # trials hold them, and the split's tasks would wait forever on a small cluster
    data_config = presplit_data_config(prepared.train, spec.scaling.num_workers)

    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec, prepared=prepared, data_config=data_config), {"cpu": TRIAL_HEAD_CPUS}
    )
    callbacks = _mlflow_callbacks(spec, tracked) + ([TrialEvents(on_trial)] if on_trial else [])
    if spec.tune.resume and tune.Tuner.can_restore(search_dir):
        say(f"resuming the search in {search_dir}")
        tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_errored=True)
    else:
        scheduler = (
            ASHAScheduler(
                time_attr="step",
                max_t=spec.train.max_steps,
                grace_period=spec.tune.grace_period * spec.train.eval_every,
                reduction_factor=spec.tune.reduction_factor,
            )
            if spec.tune.scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec.tune.space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=_searcher(spec),
                scheduler=scheduler,
                num_samples=spec.tune.num_samples,
                max_concurrent_trials=spec.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=SEARCH_DIR,
                storage_path=output,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a failing trial is reported
                verbose=0,
            ),
        )
    say(f"searching: {spec.tune.num_samples} sample(s), {spec.tune.max_concurrent_trials} at a time")
    grid = tuner.fit()
    trials = [_trial_row(spec, result) for result in grid]
    best = _best(trials)
    _write_csv(os.path.join(output, "trials.csv"), spec, trials)
    if best is not None:
        best = _export_best(best, output)
    _write_json(os.path.join(output, "best.json"), best)
    return SearchResult(output=output, trials=trials, best=best)


def require_state_api(timeout_s: float = 10.0) -> None:
    """Raise `StateApiMissing` unless Ray's state API answers.

    When ASHA stops a trial, Tune ends the trial's actor and, with it, the Ray Train controller it started; the
    controller's worker group placement group is then removed by Ray Train's detached cleaner, which learns of the
    controller's death through the state API (the dashboard's). Without it the cleaner waits forever, the stopped
    trials' CPUs stay reserved, and every later trial's workers wait for CPUs that never come free."""
    import ray
    from ray.util.state import list_nodes

    try:
        # this process's Ray, by its GCS address: without one the state API looks for any Ray on the machine
        address = ray.get_runtime_context().gcs_address
        list_nodes(address=address, limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except Exception as err:
        raise StateApiMissing(
            "Ray's state API does not answer, so a trial that ASHA stops would keep its CPUs reserved and the "
            "search would stall: start Ray with its dashboard (`ray start --head` includes it; `ray.init()` needs "
            f"`ray[default]` and include_dashboard left on) ({type(err).__name__}: {err})"
        ) from err


def _trial(config: dict[str, Any], spec: Spec, prepared, data_config) -> None:
    """One trial: the search's spec with this trial's values, trained by `chatforge train`'s trainer."""
    from ray import tune
    from ray.train import RunConfig

    from chatforge.train.trainer import build_trainer

    trial = trial_spec(spec, config)
    trial_dir = tune.get_context().get_trial_dir()
    trainer = build_trainer(
        trial,
        prepared,
        RunConfig(name="train", storage_path=os.path.join(trial_dir, "checkpoints"), callbacks=[EvalReports()]),
        data_config=data_config,
    )
    trainer.fit()


def _searcher(spec: Spec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.tune.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=METRIC, mode=MODE, sampler=optuna.samplers.TPESampler(seed=spec.tune.seed))
    return BasicVariantGenerator(random_state=spec.tune.seed)


def _mlflow_callbacks(spec: Spec, tracked: TrackedRun | None) -> list:
    """Ray's MLflow callback: each trial one MLflow run, nested under the search's own."""
    if tracked is None or not tracked.enabled:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [
        MLflowLoggerCallback(
            tracking_uri=tracking_uri(spec.tracking),
            experiment_name=spec.tracking.experiment,
            tags={"mlflow.parentRunId": tracked.run_id, "chatforge.command": "tune-trial"},
            save_artifact=False,
        )
    ]


def _trial_row(spec: Spec, result) -> dict[str, Any]:
    """A trial's line of trials.csv: its values, best eval_loss, last step, status, error."""
    history = result.metrics_dataframe
    losses = [] if history is None or METRIC not in history else [v for v in history[METRIC] if math.isfinite(v)]
    step = int(result.metrics.get("step", 0)) if result.metrics else 0
    if result.error is not None:
        status = "error"
    elif step < spec.train.max_steps and not (result.metrics or {}).get("stopped_early"):
        status = "stopped"  # by ASHA
    else:
        status = "completed"
    return {
        # Tune's id, as the live table shows it (a trial that failed before reporting has only its dir's name)
        "trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path),
        "config": dict(result.config),
        METRIC: min(losses) if losses else None,
        "steps": step,
        "status": status,
        "error": None if result.error is None else cause_line(result.error)[:300],
        # the last checkpoint rank 0 reported with an evaluation (the final one holds the exported model)
        "checkpoint": (result.metrics or {}).get(CHECKPOINT_PATH_KEY),
    }


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [t for t in trials if t[METRIC] is not None and t["status"] != "error"]
    return min(scored, key=lambda t: t[METRIC]) if scored else None


def _export_best(best: dict[str, Any], output: str) -> dict[str, Any]:
    """The best trial's exported model (its last checkpoint holds it) copied to OUTPUT/best/."""
    from chatforge.train.loop import MODEL_DIR
    from chatforge.train.trainer import export_dirs

    model_dir = None
    if best["checkpoint"] and os.path.isdir(os.path.join(best["checkpoint"], MODEL_DIR)):
        export_dirs(best["checkpoint"], os.path.join(output, "best"), (MODEL_DIR,))
        model_dir = os.path.join(output, "best", MODEL_DIR)
    return {**best, "model_dir": model_dir}


def _write_csv(path: str, spec: Spec, trials: list[dict[str, Any]]) -> None:
    keys = sorted(spec.tune.space)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", *keys, METRIC, "steps", "status", "error"])
    for t in trials:
        values = (t["config"].get(k) for k in keys)
        writer.writerow([t["trial_id"], *values, t[METRIC], t["steps"], t["status"], t["error"] or ""])
    write_atomic(path, out.getvalue())


def _write_json(path: str, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str))
