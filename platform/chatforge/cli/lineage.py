"""`chatforge lineage`: a model's data, curation, training and evaluations, from the files and from MLflow."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape
from rich.tree import Tree

from chatforge.cli.common import console, fail


def figures(details: dict) -> str:
    shown = []
    for key, value in details.items():
        if value is None or value == []:
            continue
        if key == "fingerprint":
            value = value[:8]
        elif isinstance(value, float) and value.is_integer():  # MLflow keeps counts as floats
            value = f"{int(value):,}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        shown.append(f"{key} {value}")
    return "  ".join(shown)


def lineage_tree(title: str, links) -> Tree:
    tree = Tree(f"[bold]{title}[/]")
    for link in links:
        where = f" ({link.path})" if link.path and link.path != link.label else ""
        run = f"  [cyan]run {link.run_id[:8]}[/]" if link.run_id else ""
        tree.add(f"[bold]{link.kind:<9}[/] {escape(link.label + where)}{run}  [dim]{escape(figures(link.details))}[/]")
    return tree


def lineage(
    model_dir: Annotated[str, typer.Argument(help="exported model dir: a `chatforge train` output's model/")],
    eval_dirs: Annotated[
        list[str] | None, typer.Option("--eval", "-e", help="a `chatforge eval` output dir of this model (repeatable)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the lineage as JSON on stdout")] = False,
) -> None:
    """Where a model came from: data -> curation -> training -> model -> evaluations, from the files and from
    MLflow, and where the two answers disagree."""
    from chatforge.lineage import LineageError, lineage_of

    # a store that is down should cost seconds, not MLflow's minutes of retries; a setting of the user's wins
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        found = lineage_of(model_dir, eval_dirs or [])
    except LineageError as err:
        fail(str(err))
    console.print(lineage_tree(f"{found.model_dir}, from the files", found.links))
    if found.mlflow_links is None:
        console.print(f"MLflow: {escape(found.mlflow_note or '')}", highlight=False)
    else:
        console.print(lineage_tree("from MLflow", found.mlflow_links))
    for disagreement in found.disagreements:
        console.print(f"[yellow]disagree:[/] {escape(disagreement)}", highlight=False, soft_wrap=True)
    if found.mlflow_links is not None and not found.disagreements:
        console.print("[green]the files and MLflow agree[/]")
    if json_out:
        print(json.dumps(asdict(found), indent=2))
