"""`chatforge train`: fine-tuning on Ray Train with a live progress bar, and the table that sums it up."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail, load_with_flags, quiet_ray_data
from chatforge.config import Spec, SpecError, TrainDataSpec


def _split_data_option(item: str) -> tuple[str, float, str | None]:
    """``DIR[:WEIGHT[:TAG]]`` read from the right, so paths with colons (s3://...) stay whole."""
    for n_fields in (2, 1):
        head, *fields = item.rsplit(":", n_fields)
        if len(fields) < n_fields:
            continue
        try:
            weight = float(fields[0])
        except ValueError:
            continue
        return head, weight, (fields[1] or None) if n_fields == 2 else None
    return item, 1.0, None


DataOption = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="curated data/ dir, as DIR[:WEIGHT[:TAG]] (repeatable); replaces train.data"),
]


def _data_sources(items: list[str]) -> list[TrainDataSpec]:
    """``--data DIR[:WEIGHT[:TAG]]`` -> dataset specs."""
    sources = []
    for item in items:
        path, weight, tag = _split_data_option(item)
        try:
            sources.append(TrainDataSpec(path=path, weight=weight, tag=tag))
        except ValueError as err:
            fail(f"--data {item}: expected DIR[:WEIGHT[:TAG]] ({err})")
    return sources


def with_data(spec: Spec, data: list[str] | None) -> Spec:
    """The spec with ``--data`` (when given) as its train.data, each dataset checked so bad data fails before Ray
    starts: what `train` and `tune` both take."""
    from chatforge.train.data import resolve_data_dir

    if data:
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"data": _data_sources(data)})})
    for source in spec.train.data:
        resolve_data_dir(source.path)
    return spec


def training_table(summary: dict) -> Table:
    final, data = summary["final_metrics"], summary["data"]
    table = Table(title="training")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{final.get('step')}" + (" (stopped early)" if final.get("stopped_early") else "")),
        ("train loss", f"{final.get('loss', float('nan')):.4f}"),
        (
            "val loss (best)",
            f"{final.get('eval_loss', float('nan')):.4f} ({final.get('best_eval_loss', float('nan')):.4f})",
        ),
        ("tokens/s", f"{final.get('tokens_per_s', 0):,.0f}"),
        ("parameters (trainable)", f"{final.get('total_params', 0):,} ({final.get('trainable_params', 0):,})"),
        ("train rows x tokens", f"{data['train_rows']:,} x {data['train_tokens'] // max(data['train_rows'], 1):,}"),
        ("packing efficiency", f"{data['packing_efficiency']:.3f}"),
        ("samples skipped (no supervised token)", f"{data['skipped_no_supervised_tokens']:,}"),
        ("wall seconds", f"{summary['wall_seconds']:.1f}"),
    ]
    for key, value in final.items():
        if key.startswith("eval_loss/"):
            rows.append((f"val loss {key.split('/', 1)[1]}", f"{value:.4f}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def report_fields(report: dict) -> str:
    """One training report as the progress line's metrics: loss, lr, tokens/s, and val loss when evaluated."""
    parts = []
    if "loss" in report:
        parts.append(f"loss {report['loss']:.3f}")
    if "eval_loss" in report:
        parts.append(f"val {report['eval_loss']:.3f}")
    if "lr" in report:
        parts.append(f"lr {report['lr']:.2e}")
    if "tokens_per_s" in report:
        parts.append(f"{report['tokens_per_s']:,.0f} tok/s")
    return " · ".join(parts)


@contextlib.contextmanager
def training_progress(max_steps: int):
    """A live bar for `chatforge train`: the phase before training, then step/total, metrics, elapsed and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with quiet_ray_data(), Progress(*columns, console=console) as bar:
        task = bar.add_task("starting", total=max_steps, metrics="")

        def on_report(report: dict) -> None:
            bar.update(task, description="training", completed=report.get("step", 0), metrics=report_fields(report))

        yield (lambda message: bar.update(task, description=message)), on_report


def track_training_data(tracked, spec) -> None:
    """Each training dataset as an input of the run, its digest the curation fingerprint; the combined fingerprint
    as the tag that a curation run is traced back by (`chatforge lineage`)."""
    from chatforge.tracking import FINGERPRINT_TAG
    from chatforge.train.data import combined_fingerprint, data_fingerprint, resolve_data_dir

    fingerprints = []
    for number, source in enumerate(spec.train.data):
        data_dir = resolve_data_dir(source.path)
        fingerprints.append(data_fingerprint(data_dir))
        name = source.tag or f"data{number}"
        tracked.dataset(data_dir, fingerprints[-1], name=name, context=f"training.{name}")
    if combined_fingerprint(fingerprints):
        tracked.tags({f"{FINGERPRINT_TAG}.training": combined_fingerprint(fingerprints)})


def track_training(tracked, result) -> None:
    """The final metrics (rank 0 logged each step's as it trained) and training.json and metrics.jsonl."""
    import os

    final = result.summary["final_metrics"] or {}
    tracked.metrics({f"final.{k}": v for k, v in final.items()} | {"wall_seconds": result.summary["wall_seconds"]})
    tracked.artifact(os.path.join(result.output, "training.json"))
    tracked.artifact(os.path.join(result.output, "metrics.jsonl"))


def train(
    spec: Annotated[Path, typer.Argument(help="training spec (YAML), e.g. pipelines/finetune-zero2.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    data: DataOption = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="start afresh in an OUTPUT holding an earlier run, deleting its checkpoints"),
    ] = False,
) -> None:
    """Fine-tune a chat model on curated data with Ray Train + DeepSpeed; writes OUTPUT/model and metrics."""
    from ray.train import TrainingFailedError

    from chatforge.runtime import RayConnectError, cause_line, init_ray
    from chatforge.tracking import command_run
    from chatforge.train.data import TrainDataError
    from chatforge.train.trainer import RunExistsError, run_training

    try:
        loaded = with_data(load_with_flags(spec, overrides, "train.output", output), data)
        if overwrite:
            loaded = loaded.model_copy(update={"train": loaded.train.model_copy(update={"overwrite": True})})
        init_ray(loaded.ray, idle_workers_per_cpu=0)
        with command_run(loaded, "train", output=loaded.train.output) as tracked:
            track_training_data(tracked, loaded)
            with training_progress(loaded.train.max_steps) as (phase, on_report):
                result = run_training(loaded, progress=phase, on_report=on_report, tracked=tracked)
            track_training(tracked, result)
    except (SpecError, TrainDataError, RayConnectError, RunExistsError) as err:
        fail(str(err))
    except TrainingFailedError as err:  # the workers' own error, after Ray Train's retries (scaling.max_failures)
        fail(f"training failed: {cause_line(err)}", code=1)
    console.print(training_table(result.summary))
    console.print(f"model: [bold]{result.summary['model_dir']}[/]", highlight=False, soft_wrap=True)
