"""The `chatforge` command line: each command loads a spec, applies overrides, runs on Ray, prints a summary."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chatforge.config import SourceSpec, SpecError, TrainDataSpec, load_spec

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train and run chat assistants on Ray.")
console = Console(stderr=True)

FORMAT_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "openai", ".ndjson": "openai", ".json": "sharegpt"}


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec: Path, overrides: list[str] | None, output_key: str, output: str | None):
    """The spec with the command line's overrides, ``--output`` applied last (it wins over an override)."""
    extra = list(overrides or [])
    if output:
        extra.append(f"{output_key}={output}")
    return load_spec(spec, extra)


def _inputs_as_sources(inputs: list[str], fmt: str | None) -> list[SourceSpec]:
    from chatforge.data.sources import compression, file_suffix

    sources: list[SourceSpec] = []
    for number, path in enumerate(inputs, start=1):
        suffix = file_suffix(path)  # under any compression suffix: "a.jsonl.gz" -> ".jsonl"
        chosen = fmt or FORMAT_BY_SUFFIX.get(suffix)
        if chosen is None:
            _fail(f"--input {path}: cannot tell its format from the name; pass --format sharegpt|openai|parquet")
        base = Path(path).stem if compression(path) else Path(path).name  # "a.jsonl.gz" -> "a.jsonl"
        name = Path(base).stem or f"input{number}"
        if any(s.name == name for s in sources):
            name = f"{name}-{number}"
        try:
            sources.append(SourceSpec(name=name, format=chosen, path=path))
        except ValueError as err:
            _fail(f"--input {path}: {err}")
    return sources


def curation_table(manifest: dict) -> Table:
    table = Table(title=f"curated {manifest['input_records']:,} records", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("records", "input", f"{manifest['input_records']:,}")
    table.add_row("", "kept", f"{manifest['kept']:,}")
    for reason, n in manifest["dropped"].items():
        table.add_row("dropped", reason, f"{n:,}")
    for repair, n in manifest.get("repaired", {}).items():
        if n:
            table.add_row("repaired", repair, f"{n:,}")
    if manifest.get("augmented"):
        table.add_row("augmented", "slices added", f"{manifest['augmented']:,}")
    for name, n in manifest["splits"].items():
        table.add_row("split", name, f"{n:,}")
    for kind, n in manifest["pii_replacements"].items():
        table.add_row("pii", kind, f"{n:,}")
    tox = manifest["toxicity"]
    if tox["scored"]:
        table.add_row("toxicity", "mean / max (assistant)", f"{tox['mean']:.3f} / {tox['max']:.3f}")
        table.add_row("", "user turns flagged", f"{tox['flagged_user']:,}")
    for stage in manifest["stages"]:
        table.add_row("seconds", stage["name"], f"{stage['seconds']:.1f}")
    table.add_row("seconds", "wall", f"{manifest['wall_seconds']:.1f}")
    return table


@app.command()
def curate(
    spec: Annotated[Path, typer.Argument(help="curation spec (YAML), e.g. pipelines/curate.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="input file/dir/glob (repeatable); replaces the spec's sources"),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="format of --input: sharegpt|openai|parquet|chitchat")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the manifest as JSON on stdout")] = False,
) -> None:
    """Curate conversation corpora with Ray Data into OUTPUT/data, OUTPUT/dropped and OUTPUT/manifest.json."""
    from chatforge.data.pipeline import AccountingError, run_curation
    from chatforge.data.sources import SourceError, list_files
    from chatforge.runtime import RayConnectError, init_ray

    try:
        loaded = _load(spec, overrides, "curate.output", output)
        if input:
            sources = _inputs_as_sources(input, fmt)
            loaded = loaded.model_copy(update={"curate": loaded.curate.model_copy(update={"sources": sources})})
        for source in loaded.curate.sources:
            list_files(source)  # a missing input fails here, before Ray starts
        init_ray(loaded.ray)
        with console.status("curating with Ray Data…"):
            result = run_curation(loaded)
    except (SpecError, SourceError, RayConnectError) as err:
        _fail(str(err))
    except AccountingError as err:  # a defect, not bad input: the previous output stays in place
        _fail(f"{err} (the previous output, if any, is unchanged; please report this with the spec)", code=1)
    console.print(curation_table(result.manifest))
    console.print(
        f"data: [bold]{result.output}/data[/]   dropped: {result.output}/dropped   "
        f"manifest: {result.output}/manifest.json",
        highlight=False,
    )
    if json_out:
        print(json.dumps(result.manifest))


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


def _data_sources(items: list[str]) -> list[TrainDataSpec]:
    """``--data DIR[:WEIGHT[:TAG]]`` -> dataset specs."""
    sources = []
    for item in items:
        path, weight, tag = _split_data_option(item)
        try:
            sources.append(TrainDataSpec(path=path, weight=weight, tag=tag))
        except ValueError as err:
            _fail(f"--data {item}: expected DIR[:WEIGHT[:TAG]] ({err})")
    return sources


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


def _first_line_of_cause(error: BaseException) -> str:
    """The innermost error's message (a worker's own exception, not Ray's wrapping), for a one-line failure."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


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
    import logging

    import ray.data

    # This bar is the progress: Ray Data's own bars and INFO lines for the tokenize/pack pass would interleave with it.
    data_logger = logging.getLogger("ray.data")
    level, data_logger.level = data_logger.level, logging.WARNING
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    with contextlib.ExitStack() as restore:
        restore.callback(setattr, data_logger, "level", level)
        restore.callback(setattr, context, "enable_progress_bars", bars)
        bar = restore.enter_context(Progress(*columns, console=console))
        task = bar.add_task("starting", total=max_steps, metrics="")

        def on_report(report: dict) -> None:
            bar.update(task, description="training", completed=report.get("step", 0), metrics=report_fields(report))

        yield (lambda message: bar.update(task, description=message)), on_report


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="training spec (YAML), e.g. pipelines/finetune-zero2.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", "-d", help="curated data/ dir, as DIR[:WEIGHT[:TAG]] (repeatable); replaces train.data"),
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
) -> None:
    """Fine-tune a chat model on curated data with Ray Train + DeepSpeed; writes OUTPUT/model and metrics."""
    from ray.train import TrainingFailedError

    from chatforge.runtime import RayConnectError, init_ray
    from chatforge.train.trainer import TrainDataError, resolve_data_dir, run_training

    try:
        loaded = _load(spec, overrides, "train.output", output)
        if data:
            loaded = loaded.model_copy(update={"train": loaded.train.model_copy(update={"data": _data_sources(data)})})
        for source in loaded.train.data:
            resolve_data_dir(source.path)  # bad data fails here, before Ray starts
        init_ray(loaded.ray, idle_workers_per_cpu=0)
        with training_progress(loaded.train.max_steps) as (phase, on_report):
            result = run_training(loaded, progress=phase, on_report=on_report)
    except (SpecError, TrainDataError, RayConnectError) as err:
        _fail(str(err))
    except TrainingFailedError as err:  # the workers' own error, after Ray Train's retries (scaling.max_failures)
        _fail(f"training failed: {_first_line_of_cause(err)}", code=1)
    console.print(training_table(result.summary))
    console.print(f"model: [bold]{result.summary['model_dir']}[/]", highlight=False, soft_wrap=True)


def serving_table(spec, url: str) -> Table:
    table = Table(title=f"serving at {url}")
    for column in ("variant", "model", "weight", "replicas", "cpus/gpus per replica", "max batch"):
        table.add_column(column)
    for v in spec.variants:
        scaling = v.autoscaling
        table.add_row(
            v.name,
            v.model,
            f"{v.weight:g}",
            f"{scaling.min_replicas}-{scaling.max_replicas}",
            f"{v.num_cpus:g}/{v.num_gpus:g}",
            str(v.engine.max_batch_size),
        )
    return table


CHECK_QUESTION = "Hi! How are you doing today?"


def _post(url: str, body: dict, key: str | None) -> tuple[dict, dict]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        _fail(f"check: POST {url} answered {err.code}: {err.read().decode(errors='replace')[:500]}", code=1)


def smoke_check(url: str, spec, key: str) -> list[dict]:
    """One chat completion per variant through the HTTP API (as any client would send it), each rated +1."""
    results = []
    for variant in spec.variants:
        question = {"model": variant.name, "messages": [{"role": "user", "content": CHECK_QUESTION}], "max_tokens": 32}
        answer, headers = _post(f"{url}/v1/chat/completions", question, key)
        feedback, _ = _post(f"{url}/v1/feedback", {"completion_id": answer["id"], "rating": 1}, key)
        results.append(
            {
                "variant": headers.get("x-chatforge-variant", answer["model"]),
                "answer": answer["choices"][0]["message"]["content"],
                "finish_reason": answer["choices"][0]["finish_reason"],
                "tokens": answer["usage"]["completion_tokens"],
                "feedback": feedback,
            }
        )
    return results


def check_table(results: list[dict]) -> Table:
    table = Table(title="serve check")
    for column in ("variant", "answer", "finish", "tokens", "feedback stored"):
        table.add_column(column)
    for r in results:
        table.add_row(r["variant"], r["answer"][:80], r["finish_reason"], str(r["tokens"]), f"#{r['feedback']['id']}")
    return table


@app.command()
def serve(
    spec: Annotated[
        Path, typer.Argument(help="spec (YAML) whose `serve` section is used, e.g. pipelines/quickstart.yaml")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. serve.port=8001")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="exported model dir; replaces the first variant's model")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="HTTP port (default: serve.port, 8000)")] = None,
    host: Annotated[str | None, typer.Option("--host", help="bind address (default: serve.host, 127.0.0.1)")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="start, ask each variant one question, rate the answer, then stop")
    ] = False,
) -> None:
    """Serve chat models on Ray Serve behind an OpenAI-compatible API; runs until Ctrl-C or SIGTERM."""
    import os
    import secrets
    import signal
    import threading

    from chatforge.runtime import RayConnectError, init_ray
    from chatforge.serve.app import build_app, http_options, prepare_spec
    from chatforge.serve.auth import ApiKeys, check_access

    extra = list(overrides or [])
    extra += [f"serve.port={port}"] if port is not None else []
    extra += [f"serve.host={host}"] if host else []
    try:
        loaded = load_spec(spec, extra)
        serve_spec = loaded.serve
        if model:
            first = serve_spec.variants[0].model_copy(update={"model": model})
            serve_spec = serve_spec.model_copy(update={"variants": [first, *serve_spec.variants[1:]]})
        serve_spec = prepare_spec(serve_spec)
        check_key = None
        if check:  # the check asks with a key of its own, valid while this process serves, beside any configured
            check_key = secrets.token_urlsafe(32)
            env = serve_spec.auth.api_keys_env or "CHATFORGE_API_KEYS"
            os.environ[env] = ",".join(k for k in (os.environ.get(env, ""), check_key) if k)
            auth = serve_spec.auth.model_copy(update={"api_keys_env": env})
            serve_spec = serve_spec.model_copy(update={"auth": auth})
        # before anything starts; the ingress checks again where it runs, against the address Serve really binds
        check_access(ApiKeys.from_spec(serve_spec.auth), serve_spec.auth.anonymous, serve_spec.host)
    except (SpecError, ValueError) as err:
        _fail(str(err))

    stop = threading.Event()
    import ray
    from ray import serve as ray_serve
    from ray.serve.exceptions import RayServeException

    try:
        init_ray(loaded.ray)
        # after ray.init, which installs a SIGTERM handler of its own that aborts the process
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        ray_serve.start(http_options=http_options(serve_spec))
        with console.status("starting the model replicas…"):
            ray_serve.run(
                build_app(serve_spec.model_dump(mode="json")), name="chatforge", route_prefix="/", blocking=False
            )
        url = f"http://{serve_spec.host}:{serve_spec.port}"
        console.print(serving_table(serve_spec, url))
        console.print(
            f"OpenAI base URL: [bold]{url}/v1[/]   feedback: {url}/v1/feedback   health: {url}/healthz   "
            "(Ctrl-C stops)",
            highlight=False,
            soft_wrap=True,
        )
        if check:
            results = smoke_check(url, serve_spec, check_key)
            # Not the table's title: a title wraps to the table's width, which follows the answers' length.
            console.print(f"check: {CHECK_QUESTION!r} to each variant, each answer rated +1", soft_wrap=True)
            console.print(check_table(results))
        else:
            while not stop.wait(0.5):
                pass
        console.print("stopping…")
    except (SpecError, RayConnectError) as err:
        _fail(str(err))
    except RayServeException as err:  # a replica that cannot start (a broken model dir, too few resources)
        _fail(f"Ray Serve could not start the application: {err}")
    finally:
        if ray.is_initialized():
            try:
                ray_serve.shutdown()
            finally:
                ray.shutdown()


@app.command()
def version() -> None:
    """Print the chatforge version."""
    import chatforge

    print(chatforge.__version__)


if __name__ == "__main__":
    app()
