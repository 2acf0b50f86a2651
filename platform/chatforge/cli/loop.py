"""`chatforge loop`: one continual-learning cycle with a live status line, and the table that sums it up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail, load_with_flags, quiet_ray_data
from chatforge.config import SpecError


def cycle_table(result) -> Table:
    record = result.record
    ids = record["feedback_ids"]
    title = f"cycle {result.cycle.number}" + (" (reopened)" if result.cycle.reopened else "")
    table = Table(title=title)
    table.add_column("", style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("feedback ids", "after, up to", f"{ids['after']}, {ids['upto']}")
    table.add_row("rows", "read", f"{record['rows_read']:,}")
    for kind, n in record["kinds"].items():
        table.add_row("", kind, f"{n:,}")
    selected = record["selected"]
    table.add_row("selected", "review queue", f"{selected['review']['conversations']:,}")
    table.add_row("", "to train on", f"{selected['train']['conversations']:,}")
    curation = record["curation"]
    table.add_row("curated", "kept", f"{curation['kept']:,} of {curation['input_records']:,}")
    for reason, n in curation["dropped"].items():
        table.add_row("", f"dropped: {reason}", f"{n:,}")
    training = record["training"]
    loss = training["eval_loss"]
    table.add_row("training", "steps", f"{training['steps']}")
    table.add_row("", "val loss", "-" if loss is None else f"{loss:.4f}")
    table.add_row("", "replay ratio", f"{training['replay_ratio']:g}")
    gate = record["eval"]["gate"]
    verdict = "[green]PASS[/]" if gate["passed"] else "[red]FAIL[/]"
    table.add_row("gate", "; ".join(gate["reasons"]), verdict)
    decision, deployment = record.get("canary"), record.get("deployment")
    if decision:
        table.add_row("canary", f"{decision['canary']}: {decision['reason']}", decision["action"])
    if deployment and deployment.get("error"):
        table.add_row("deployment", deployment["error"], "[red]failed[/]")
    elif deployment:
        weights = ", ".join(f"{name} {weight:g}" for name, weight in deployment["weights"].items())
        table.add_row("deployment", f"{deployment['canary']} on {deployment['app']}: {weights}", "canary")
    return table


def track_cycle(tracked, result) -> None:
    """The cycle's MLflow record: which cycle and feedback ids, its counts, the candidate, cycle.json."""
    import os

    from chatforge.continual.cycle import CYCLE_JSON
    from chatforge.tracking import FINGERPRINT_TAG

    record = result.record
    ids = record["feedback_ids"]
    tracked.tags(
        {
            "chatforge.loop.cycle": result.cycle.number,
            "chatforge.loop.status": result.status,
            "chatforge.loop.feedback_ids": f"({ids['after']}, {ids['upto']}]",
        }
    )
    metrics = {"rows_read": record.get("rows_read", 0)}
    if "selected" in record:
        metrics["conversations.review"] = record["selected"]["review"]["conversations"]
        metrics["conversations.train"] = record["selected"]["train"]["conversations"]
    if "curation" in record:
        metrics["curated.kept"] = record["curation"]["kept"]
        tracked.tags({f"{FINGERPRINT_TAG}.output": record["curation"]["fingerprint"]})
    if "training" in record:
        metrics["final.eval_loss"] = record["training"]["eval_loss"]
        if record["training"]["fingerprint"]:
            tracked.tags({f"{FINGERPRINT_TAG}.training": record["training"]["fingerprint"]})
    if "eval" in record:
        metrics["gate.passed"] = int(record["eval"]["gate"]["passed"])
        tracked.tags({"chatforge.loop.candidate_model": record["candidate_model"]})
    for key in ("canary", "deployment"):
        change = record.get(key)
        if change:
            tracked.tags({f"chatforge.loop.{key}": f"{change['action']} {change['canary']} on {change['app']}"})
    tracked.metrics(metrics)
    if result.output:
        tracked.artifact(os.path.join(result.output, CYCLE_JSON))


def abandon_open_cycle(spec: Path, overrides: list[str] | None, output: str | None) -> None:
    """`chatforge loop --abandon`: forget the open cycle, if there is one."""
    import sqlalchemy as sa

    from chatforge.continual.cycle import LoopInputError, open_store
    from chatforge.continual.watermark import Cycle, CycleConflict, abandon_cycle, cycles

    try:
        store = open_store(load_with_flags(spec, overrides, "loop.output", output))
    except (SpecError, LoopInputError) as err:
        fail(str(err))
    try:
        last = (cycles(store) or [None])[-1]
        if last is None or last["committed"] is not None:
            console.print("no open cycle: nothing to abandon")
            return
        cycle = Cycle(last["cycle"], last["after_feedback_id"], last["upto_feedback_id"], reopened=True)
        abandon_cycle(store, cycle)
    except CycleConflict as err:
        fail(str(err), code=1)
    except sa.exc.OperationalError as err:
        fail(f"the feedback store cannot be reached: {err.orig}", code=1)
    finally:
        store.dispose()
    console.print(
        f"abandoned cycle {cycle.number}: feedback ids {cycle.after_feedback_id + 1} to {cycle.upto_feedback_id} go "
        "to the next cycle",
        highlight=False,
    )


def loop(
    spec: Annotated[Path, typer.Argument(help="loop spec (YAML), e.g. pipelines/continual.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory (loop.output)")] = None,
    abandon: Annotated[
        bool,
        typer.Option(
            "--abandon",
            help="forget the cycle an earlier run left open (it failed part way): its feedback rows go to the next "
            "cycle, with any newer ones, instead of being retried alone; runs no cycle",
        ),
    ] = False,
) -> None:
    """Run one continual-learning cycle: the feedback since the last cycle to a review queue and curated training
    data, a candidate fine-tuned from the deployed model with replay, and its eval gate; writes
    OUTPUT/cycle-NNNN/cycle.json. A cycle that fails is retried, with the same feedback, by the next run."""
    import sqlalchemy as sa
    from ray.train import TrainingFailedError

    from chatforge.continual.cycle import LoopInputError, loop_inputs, open_store, run_cycle
    from chatforge.continual.watermark import CycleConflict
    from chatforge.data.pipeline import AccountingError
    from chatforge.eval.prompts import PromptSetError
    from chatforge.eval.run import EvalInputError
    from chatforge.runtime import RayConnectError, cause_line, init_ray
    from chatforge.tracking import command_run
    from chatforge.train.data import TrainDataError

    if abandon:
        abandon_open_cycle(spec, overrides, output)
        return
    try:
        loaded = load_with_flags(spec, overrides, "loop.output", output)
        loop_inputs(loaded)  # a missing model or data dir, or an unreachable store, fails here, before Ray starts
        open_store(loaded).dispose()
        init_ray(loaded.ray, idle_workers_per_cpu=0)  # the cycle's curation is small; its fine-tuning is not
        with (
            command_run(loaded, "loop", output=loaded.loop.output) as tracked,
            quiet_ray_data(),
            console.status("starting the cycle…") as status,
        ):
            result = run_cycle(loaded, progress=status.update, tracked=tracked)
            track_cycle(tracked, result)
    except (SpecError, LoopInputError, TrainDataError, EvalInputError, PromptSetError, RayConnectError) as err:
        fail(str(err))
    except TrainingFailedError as err:  # the workers' own error, after Ray Train's retries (scaling.max_failures)
        fail(f"fine-tuning failed: {cause_line(err)}", code=1)
    except AccountingError as err:
        fail(f"curating the feedback failed: {err}", code=1)
    except CycleConflict as err:
        fail(str(err), code=1)
    except sa.exc.OperationalError as err:
        fail(f"the feedback store failed during the cycle: {err.orig}", code=1)

    ids = result.record["feedback_ids"]
    if result.status == "no_new_feedback":
        console.print(f"cycle {result.cycle.number}: no new feedback after feedback id {ids['after']}; nothing to do")
        return
    if result.status == "not_enough_feedback":
        console.print(
            f"cycle {result.cycle.number}: too few conversations to train on (loop.min_train_conversations is "
            f"{loaded.loop.min_train_conversations}); feedback ids {ids['after'] + 1} to {ids['upto']} wait for the "
            "next cycle",
            highlight=False,
        )
        return
    console.print(cycle_table(result))
    deployment = result.record.get("deployment") or {}
    if deployment.get("error"):
        fail(f"the cycle is committed, but its candidate was not deployed: {deployment['error']}", code=1)
    console.print(
        f"cycle: [bold]{result.output}/cycle.json[/]   review queue: {result.record['selected']['review']['file']}   "
        f"candidate: {result.record['candidate_model']}   eval: {result.record['eval']['output']}",
        highlight=False,
        soft_wrap=True,
    )
