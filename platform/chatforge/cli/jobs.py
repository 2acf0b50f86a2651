"""`chatforge submit`, `status` and `logs`: a chatforge command as a Ray Job on a cluster (`chatforge.jobs`)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail

Address = Annotated[
    str | None,
    typer.Option("--address", "-a", help="the cluster's Ray dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)"),
]


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "—"


def job_table(info) -> Table:
    table = Table(title=f"job {info.job_id}", show_header=False, title_justify="left")
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(info.status, "cyan")
    table.add_row("status", f"[{colour}]{info.status}[/]")
    table.add_row("entrypoint", info.entrypoint)
    table.add_row("started", _when(info.start_time))
    table.add_row("ended", _when(info.end_time))
    if info.seconds is not None:
        table.add_row("seconds", f"{info.seconds:,.1f}")
    if info.message:
        table.add_row("message", info.message)
    table.add_row("dashboard", info.url)
    return table


def _follow(jobs, job_id: str) -> None:
    for text in jobs.follow(job_id):
        sys.stdout.write(text)
        sys.stdout.flush()


def submit(
    ctx: typer.Context,
    command: Annotated[str, typer.Argument(help="the chatforge command to run: curate, train, tune, eval, loop, run")],
    spec: Annotated[str, typer.Argument(help="its spec file (YAML); uploaded with the job")],
    address: Address = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="follow the job's log to its end; exit 1 unless it succeeds")
    ] = False,
    no_package: Annotated[
        bool, typer.Option("--no-package", help="run the cluster image's chatforge instead of uploading this one")
    ] = False,
) -> None:
    """Run `chatforge COMMAND SPEC [ARGS]...` on a Ray cluster as a Ray Job. Arguments after SPEC (key=value
    overrides, --data, --output, ...) go to the command; outputs belong on shared storage (/mnt/shared, s3://)."""
    from chatforge.jobs import Jobs, JobsError

    try:
        jobs = Jobs(address)
        job_id = jobs.submit(command, spec, list(ctx.args), with_package=not no_package)
        console.print(
            f"submitted [bold]{job_id}[/]   dashboard: {jobs.job_url(job_id)}", highlight=False, soft_wrap=True
        )
        print(job_id)  # stdout: for scripts
        if not wait:
            console.print(f"follow it: chatforge logs {job_id} --follow", highlight=False)
            return
        _follow(jobs, job_id)
        info = jobs.info(job_id)
    except JobsError as error:
        fail(str(error))
    console.print(job_table(info))
    if info.status != "SUCCEEDED":
        fail(f"job {job_id} {info.status.lower()}: {info.message or 'see its log above'}", code=1)


def status(
    job_id: Annotated[str, typer.Argument(help="the job's id (what `chatforge submit` printed)")],
    address: Address = None,
) -> None:
    """A Ray Job's status, times and dashboard link."""
    from chatforge.jobs import Jobs, JobsError

    try:
        info = Jobs(address).info(job_id)
    except JobsError as error:
        fail(str(error))
    console.print(job_table(info))
    print(info.status)


def logs(
    job_id: Annotated[str, typer.Argument(help="the job's id (what `chatforge submit` printed)")],
    address: Address = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
) -> None:
    """A Ray Job's log (its driver's output) on stdout."""
    from chatforge.jobs import Jobs, JobsError

    try:
        jobs = Jobs(address)
        if follow:
            _follow(jobs, job_id)
        else:
            sys.stdout.write(jobs.logs(job_id))
    except JobsError as error:
        fail(str(error))
