"""The `chatforge` command line: each command loads a spec, applies overrides, runs on Ray, prints a summary.

One module per command group defines its commands; this module names them all on one `app`. Heavy imports (ray,
torch, transformers) stay inside the command bodies, so `chatforge --help` answers without them.
"""

from __future__ import annotations

import typer

from chatforge.cli import curate, eval, jobs, lineage, loop, run, serve, train, tune

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train and run chat assistants on Ray.")

app.command()(curate.curate)
app.command()(train.train)
app.command()(serve.serve)
app.command()(tune.tune)
app.command(name="eval")(eval.eval)
app.command()(lineage.lineage)
app.command()(loop.loop)
app.command()(run.run)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(jobs.submit)
app.command()(jobs.status)
app.command()(jobs.logs)


@app.command()
def version() -> None:
    """Print the chatforge version."""
    import chatforge

    print(chatforge.__version__)
