"""`chatforge eval`: perplexity, toxicity and bias of a model's generations, a gate against a baseline, a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail, load_with_flags
from chatforge.config import SpecError


def evaluation_table(data: dict) -> Table:
    baseline = data.get("baseline") or {}
    table = Table(title="evaluation")
    table.add_column("", style="bold")
    table.add_column("model", justify="right")
    if baseline:
        table.add_column("baseline", justify="right")

    def cell(source: dict, key: str, fmt: str) -> str:
        value = source.get(key)
        return "-" if value is None else format(value, fmt)

    bias = lambda source: (source.get("bias") or {}).get("max_gap")  # noqa: E731
    rows = [
        ("perplexity", lambda s: cell(s, "perplexity", ".2f")),
        ("toxicity rate", lambda s: cell(s, "toxicity_rate", ".3f")),
        ("refusal rate", lambda s: cell(s, "refusal_rate", ".3f")),
        ("bias max gap", lambda s: "-" if not isinstance(bias(s), int | float) else f"{bias(s):.3f}"),
    ]
    for name, show in rows:
        table.add_row(name, show(data), *([show(baseline)] if baseline else []))
    gate = data.get("gate")
    if gate:
        verdict = "[green]PASS[/]" if gate["passed"] else "[red]FAIL[/]"
        table.add_row("gate", verdict, "; ".join(gate["reasons"]) if gate["reasons"] else "")
    return table


def eval(  # noqa: A001  (the command's name)
    spec: Annotated[
        Path, typer.Argument(help="spec (YAML) whose `eval` section is used, e.g. pipelines/quickstart.yaml")
    ],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="exported model dir to evaluate")] = ...,
    baseline: Annotated[
        str | None, typer.Option("--baseline", "-b", help="model dir to compare with; adds the gate's verdict")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="curation output (or its data/) holding the test split")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
) -> None:
    """Evaluate a model: perplexity, toxicity and bias probes, explained samples; writes OUTPUT/eval.json and
    report.html. With --baseline, a gate passes or fails it (exit 0 either way: the verdict is data)."""
    from chatforge.eval.prompts import PromptSetError
    from chatforge.eval.run import EvalInputError, run_evaluation
    from chatforge.runtime import RayConnectError
    from chatforge.tracking import command_run, register_model

    try:
        loaded = load_with_flags(spec, overrides, "eval.output", output)
        with (
            command_run(loaded, "eval", output=loaded.eval.output) as tracked,
            console.status("evaluating…") as status,
        ):
            result = run_evaluation(
                loaded,
                model,
                baseline_dir=baseline,
                data_dir=data,
                output_dir=output,
                progress=status.update,
                tracking=tracked.record(),
            )
            tracked.tags({"chatforge.model_dir": str(Path(model).resolve())})
            tracked.metrics(
                {
                    key: result.data.get(key)
                    for key in ("perplexity", "toxicity_rate", "refusal_rate")
                    if isinstance(result.data.get(key), int | float)
                }
                | ({"bias_max_gap": result.data["bias"]["max_gap"]} if result.data.get("bias") else {})
            )
            tracked.artifact(result.eval_json)
            tracked.artifact(result.report_html)
            version = register_model(tracked, model, loaded.tracking.registered_model) if result.passed else None
    except (SpecError, EvalInputError, PromptSetError, RayConnectError) as err:
        fail(str(err))
    console.print(evaluation_table(result.data))
    console.print(
        f"eval: [bold]{result.eval_json}[/]   report: {result.report_html}"
        + (f"   registered: {loaded.tracking.registered_model} v{version} @candidate" if version else ""),
        highlight=False,
        soft_wrap=True,
    )
