"""What every command shares: the console, the error exit, and the spec with the command line applied."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from chatforge.config import Spec, load_spec

# stderr: stdout stays free for what a command prints for other programs (`curate --json`, `version`)
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit: 2 for input the user can fix, 1 for a failure of the run itself."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_with_flags(spec: Path, overrides: list[str] | None, output_key: str, output: str | None) -> Spec:
    """The spec with the command line's overrides, ``--output`` applied last (it wins over an override)."""
    extra = list(overrides or [])
    if output:
        extra.append(f"{output_key}={output}")
    return load_spec(spec, extra)


@contextlib.contextmanager
def quiet_ray_data():
    """A command's own progress display is the progress: Ray Data's bars and INFO lines (the driver's and, through
    the context, the workers') would interleave with it."""
    import ray.data

    data_logger = logging.getLogger("ray.data")
    context = ray.data.DataContext.get_current()
    level, bars = data_logger.level, context.enable_progress_bars
    data_logger.setLevel(logging.WARNING)
    context.enable_progress_bars = False
    try:
        yield
    finally:
        data_logger.setLevel(level)
        context.enable_progress_bars = bars
