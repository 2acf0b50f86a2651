"""`chatforge tune`: a hyperparameter search on Ray Tune, with a live line per trial and the table of all trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail, load_with_flags
from chatforge.cli.train import DataOption, track_training_data, with_data
from chatforge.config import SpecError


def trials_table(result) -> Table:
    keys = sorted({key for trial in result.trials for key in trial["config"]})
    best = result.best["trial_id"] if result.best else None
    table = Table(title=f"{len(result.trials)} trials")
    table.add_column("trial", style="bold")
    for key in keys:
        table.add_column(key, justify="right")
    for column in ("eval_loss", "steps", "status"):
        table.add_column(column, justify="right")
    for trial in sorted(result.trials, key=lambda t: (t["eval_loss"] is None, t["eval_loss"] or math.inf)):
        values = [_short(trial["config"].get(key)) for key in keys]
        loss = "-" if trial["eval_loss"] is None else f"{trial['eval_loss']:.4f}"
        status = trial["status"] + (f": {trial['error']}" if trial["error"] else "")
        name = trial["trial_id"] + (" (best)" if trial["trial_id"] == best else "")
        table.add_row(name, *values, loss, str(trial["steps"]), status)
    return table


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def tune(
    spec: Annotated[Path, typer.Argument(help="search spec (YAML) with a tune section, e.g. pipelines/tune.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    data: DataOption = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
) -> None:
    """Search training hyperparameters on Ray Tune (ASHA on eval_loss); writes OUTPUT/trials.csv and best.json."""
    from ray.tune.error import TuneError

    from chatforge.runtime import RayConnectError, cause_line, init_ray
    from chatforge.tracking import command_run
    from chatforge.train.data import TrainDataError
    from chatforge.tune.search import StateApiMissing, run_search
    from chatforge.tune.space import check_space

    try:
        loaded = with_data(load_with_flags(spec, overrides, "tune.output", output), data)
        check_space(loaded)
        init_ray(loaded.ray, idle_workers_per_cpu=0)
        seen: dict[str, str] = {}

        def on_trial(trial_id: str, event: str, result: dict | None) -> None:
            result = result or {}
            loss = f"eval_loss {result['eval_loss']:.4f} at step {result.get('step')}" if "eval_loss" in result else ""
            line = {"result": loss, "complete": f"done, {loss}", "error": "failed"}[event]
            if line and seen.get(trial_id) != line:
                seen[trial_id] = line
                console.print(f"  {trial_id}: {line}", highlight=False)

        with (
            command_run(loaded, "tune", output=loaded.tune.output) as tracked,
            console.status("searching…") as status,
        ):
            track_training_data(tracked, loaded)
            result = run_search(loaded, progress=status.update, tracked=tracked, on_trial=on_trial)
            if result.best:
                tracked.metrics({"best_eval_loss": result.best["eval_loss"]})
            tracked.artifact(f"{result.output}/trials.csv")
            tracked.artifact(f"{result.output}/best.json")
    except (SpecError, TrainDataError, RayConnectError, StateApiMissing) as err:
        fail(str(err))
    except TuneError as err:
        fail(f"the search failed: {cause_line(err)}", code=1)
    console.print(trials_table(result))
    where = f"trials: [bold]{result.output}/trials.csv[/]   best: {result.output}/best.json"
    if result.best and result.best.get("model_dir"):
        where += f"   best model: {result.best['model_dir']}"
    console.print(where, highlight=False, soft_wrap=True)
