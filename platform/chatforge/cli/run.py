"""`chatforge run`: the lifecycle in one command (`chatforge.lifecycle`), with a table of the stages at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.rule import Rule
from rich.table import Table

from chatforge.cli.common import console, fail
from chatforge.config import SpecError


def stages_table(run) -> Table:
    table = Table(title=f"chatforge run: {run.status}")
    for column in ("stage", "status", "seconds", "output"):
        table.add_column(column, overflow="fold")
    for stage in run.stages:
        status = "[green]ok[/]" if stage.status == "ok" else stage.status
        if stage.status not in ("ok", "not run"):
            status = f"[red]{stage.status}[/]"
        table.add_row(stage.name, status, "-" if stage.seconds is None else f"{stage.seconds:.0f}", stage.output or "")
    return table


def run(
    spec: Annotated[
        Path, typer.Argument(help="spec (YAML) with every stage's section, e.g. pipelines/quickstart.yaml")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, given to every stage")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="output directory (default: runs/NAME, the spec's name)")
    ] = None,
    ratings: Annotated[
        int, typer.Option("--ratings", min=1, max=1000, help="simulated users who ask the server and rate it")
    ] = 16,
    port: Annotated[int | None, typer.Option("--port", help="the server's port (default: a free one)")] = None,
) -> None:
    """Run the whole lifecycle: curate, train, eval, serve (a smoke request and simulated users' ratings), one
    continual-learning cycle on those ratings, and stop the server. Each stage is the chatforge command of its name;
    OUTPUT/summary.json says how each went and links data -> run -> model -> deployment."""
    from chatforge.config import load_spec
    from chatforge.lifecycle import StageFailed, run_lifecycle

    extra = list(overrides or [])
    try:
        name = load_spec(spec, extra).name
    except SpecError as err:
        fail(str(err))
    out = output or f"runs/{name}"

    def say(message: str) -> None:
        if message.startswith("stage "):
            console.print(Rule(message, align="left"))
        else:
            console.print(message, highlight=False, soft_wrap=True)

    try:
        result = run_lifecycle(str(spec), extra, out, ratings, port, say)
    except SpecError as err:
        fail(str(err))
    except StageFailed as err:
        console.print(stages_table(err.run))
        fail(f"{err.run.status}: {err} (summary: {Path(out, 'summary.json')})", code=1)
    console.print(stages_table(result))
    console.print(f"summary: [bold]{Path(out, 'summary.json')}[/]", highlight=False, soft_wrap=True)
