"""`chatforge serve`: the Serve application started from a spec, its tables, and the `--check` smoke test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail
from chatforge.config import SpecError, load_spec

APP_NAME = "chatforge"  # the Serve application's name (loop.canary.app's default)
DEPLOY_TIMEOUT_S = 600.0  # --via-dashboard: how long the replicas may take to start


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
        fail(f"check: POST {url} answered {err.code}: {err.read().decode(errors='replace')[:500]}", code=1)


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
    via_dashboard: Annotated[
        bool,
        typer.Option(
            "--via-dashboard",
            help="deploy from a Serve config through the Ray dashboard's REST API, as `serve deploy` does, so that "
            "`chatforge loop` can add canaries to the running app (loop.canary.dashboard)",
        ),
    ] = False,
) -> None:
    """Serve chat models on Ray Serve behind an OpenAI-compatible API; runs until Ctrl-C or SIGTERM."""
    import os
    import secrets
    import signal
    import threading

    from chatforge.continual.canary import CanaryError, deploy_app
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
        fail(str(err))

    stop = threading.Event()
    import ray
    from ray import serve as ray_serve
    from ray.serve.exceptions import RayServeException

    try:
        dashboard = init_ray(loaded.ray)
        # after ray.init, which installs a SIGTERM handler of its own that aborts the process
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        ray_serve.start(http_options=http_options(serve_spec))
        with console.status("starting the model replicas…"):
            if via_dashboard:
                if not dashboard:
                    fail("--via-dashboard: this Ray has no dashboard (install ray[default], or serve without it)")
                deploy_app(dashboard, APP_NAME, serve_spec.model_dump(mode="json"), DEPLOY_TIMEOUT_S)
            else:
                ray_serve.run(
                    build_app(serve_spec.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False
                )
        url = f"http://{serve_spec.host}:{serve_spec.port}"
        console.print(serving_table(serve_spec, url))
        if dashboard:
            how = "deployed from a config: `chatforge loop` can add canaries" if via_dashboard else "serve.run"
            console.print(f"Ray dashboard: [bold]{dashboard}[/] ({how})", highlight=False, soft_wrap=True)
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
        fail(str(err))
    except (RayServeException, CanaryError) as err:  # a replica that cannot start (a broken model dir, few CPUs)
        fail(f"Ray Serve could not start the application: {err}")
    finally:
        if ray.is_initialized():
            try:
                ray_serve.shutdown()
            finally:
                ray.shutdown()
