"""`chatforge tune`'s search on a 2-CPU Ray: pipelines/tune.yaml's four trials of the scratch GPT, two at a time."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest

from chatforge.config import load_spec
from chatforge.tune.search import run_search
from helpers.train_data import write_curated

# The search needs the dashboard: a stopped trial's workers are freed through the state API (docs/tuning.md).
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def searched(ray_with_dashboard, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = write_curated(root / "curated", n_train=240, n_val=32)
    spec = load_spec(
        "pipelines/tune.yaml",
        [
            f"train.data=[{{path: '{data}'}}]",
            f"tune.output={root / 'out'}",
            "tracking.enabled=false",
            # Two learning rates that learn, then two that barely do: the grid's trials start in order, two at a
            # time, so the slow ones reach ASHA's first rung after the good ones have set it and are stopped there,
            # whatever the timing (random draws made that depend on which trial reported first).
            "tune.algorithm=grid",
            "tune.num_samples=1",
            "tune.space={train.lr: {grid: [3.0e-3, 1.0e-2, 1.0e-5, 2.0e-5]}}",
            "train.max_steps=20",
            "train.eval_every=5",
        ],
    )
    events: list[tuple[str, str]] = []
    lock = threading.Lock()  # the CLI's function holds a console, and a console holds locks: Tune must not pickle it

    def on_trial(trial_id: str, event: str, result: dict | None) -> None:
        with lock:
            events.append((trial_id, event))

    result = run_search(spec, on_trial=on_trial)
    return spec, result, events


def test_every_trial_is_reported_and_asha_stops_at_least_one(searched):
    spec, result, events = searched
    assert len(result.trials) == 4
    statuses = [t["status"] for t in result.trials]
    assert "error" not in statuses, [t["error"] for t in result.trials]
    assert "stopped" in statuses, [(t["config"], t["steps"], t["eval_loss"]) for t in result.trials]
    assert any(t["steps"] < spec.train.max_steps for t in result.trials)
    with open(f"{result.output}/trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"train.lr", "eval_loss", "steps", "status"} <= set(rows[0])


def test_best_json_names_the_trial_with_the_lowest_eval_loss_and_its_model(searched):
    _, result, _ = searched
    best = json.loads(Path(result.output, "best.json").read_text())
    lowest = min((t for t in result.trials if t["eval_loss"] is not None), key=lambda t: t["eval_loss"])
    assert best["trial_id"] == lowest["trial_id"] and best["eval_loss"] == pytest.approx(lowest["eval_loss"])
    assert best["config"]["train.lr"] == pytest.approx(lowest["config"]["train.lr"])
    assert best["model_dir"] and Path(best["model_dir"], "config.json").is_file()


def test_the_driver_hears_each_trials_evaluations_and_its_end(searched):
    _, result, events = searched
    ids = {t["trial_id"] for t in result.trials}
    ended = {trial for trial, event in events if event in ("complete", "error")}
    assert {trial for trial, event in events if event == "result"} and ended == ids


def test_a_failing_trial_is_reported_and_a_resumed_search_reruns_only_what_did_not_finish(ray_with_dashboard, tmp_path):
    data = write_curated(tmp_path / "curated", n_train=120, n_val=16)
    overrides = [
        f"train.data=[{{path: '{data}'}}]",
        f"tune.output={tmp_path / 'out'}",
        "tracking.enabled=false",
        "tune.scheduler=fifo",
        "tune.algorithm=grid",
        "tune.num_samples=1",
        "tune.space={train.lr: {grid: [1.0e+30, 1.0e-3]}}",  # the first diverges: NonFiniteLossError
        "train.max_steps=6",
        "train.eval_every=3",
    ]
    first = run_search(load_spec("pipelines/tune.yaml", overrides))
    by_lr = {t["config"]["train.lr"]: t for t in first.trials}
    assert by_lr[1e30]["status"] == "error" and "NonFiniteLossError" in by_lr[1e30]["error"]
    assert by_lr[1e-3]["status"] == "completed" and first.best["trial_id"] == by_lr[1e-3]["trial_id"]

    resumed = run_search(load_spec("pipelines/tune.yaml", [*overrides, "tune.resume=true"]))
    again = {t["config"]["train.lr"]: t for t in resumed.trials}
    assert again[1e30]["status"] == "error"  # rerun (resume_errored), and it fails the same way
    # the finished trial is restored as it was, not trained again
    assert again[1e-3]["trial_id"] == by_lr[1e-3]["trial_id"] and again[1e-3]["eval_loss"] == by_lr[1e-3]["eval_loss"]
