"""A cycle's candidate as a canary on the running Serve application, and its promotion or rollback.

The application is changed the way `serve deploy` and KubeRay's RayService change it: a Serve config put to the Ray
dashboard's REST API (``PUT /api/serve/applications/``), built from the config the application runs now
(``GET``'s ``deployed_app_config``). So it must have been deployed from a config (`serve deploy`, a RayService, the
REST API), not with ``serve.run``, whose applications have no config to build on; the error says so.

- **Deploy.** The candidate joins ``build_app``'s args as one more variant, and the ingress's ``user_config`` weights
  give it ``weight`` of the traffic and the other variants the rest, in their proportions. Serve starts the new
  variant's replicas and rolls the ingress over to the new args; the variants that did not change keep running.
- **Decide.** A later cycle compares the canary's positive-rating rate with production's since the canary went
  live (`chatforge.continual.stats.compare_variants`).
- **Promote or roll back.** Only the ingress's ``user_config`` changes: all traffic to the canary, or none. Serve
  calls the ingress's ``reconfigure``; no replica restarts, no request is lost. The variant that lost keeps its
  replicas at weight 0, so the opposite move stays one weight change away.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from chatforge.config import CanarySpec

INGRESS = "chatforge-ingress"  # chatforge.serve.app.INGRESS_NAME, without importing Serve's app module here
APPLICATIONS_PATH = "/api/serve/applications/"
BUILD_APP = "chatforge.serve.app:build_app"  # the import path a Serve config names


class CanaryError(RuntimeError):
    """The running application cannot take the change; the message says why and what to do."""


@dataclass(frozen=True)
class Change:
    """What a deploy, promotion or rollback did, as cycle.json records it."""

    action: str  # deploy | promote | rollback | wait
    app: str
    canary: str
    production: str | None
    weights: dict[str, float]
    at: float
    reason: str = ""
    model: str | None = None  # the canary's model dir

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- the config, as pure functions


def app_config(details: dict[str, Any], app: str) -> dict[str, Any]:
    """The running application's Serve config from ``GET /api/serve/applications/``."""
    found = (details.get("applications") or {}).get(app)
    if found is None:
        names = sorted(details.get("applications") or {})
        raise CanaryError(f"no Serve application named {app!r} is running (running: {names or 'none'})")
    config = found.get("deployed_app_config")
    if not config:
        raise CanaryError(
            f"the Serve application {app!r} was started with serve.run (as `chatforge serve` does), so it has no "
            "config to add a canary to: deploy it from a Serve config (`serve deploy`, a KubeRay RayService, or "
            "PUT /api/serve/applications/) and run the cycle again"
        )
    return copy.deepcopy(config)


def serve_args(config: dict[str, Any]) -> dict[str, Any]:
    """The application's ``build_app`` args as ServeSpec fields (a ``{"spec": ...}`` form is loaded)."""
    from chatforge.serve.app import load_serve_spec

    return load_serve_spec(config.get("args") or {}).model_dump(mode="json")


def current_weights(config: dict[str, Any], args: dict[str, Any]) -> dict[str, float]:
    """The traffic weights the ingress runs with: its user_config's, else the variants' own."""
    for deployment in config.get("deployments") or []:
        if deployment.get("name") == INGRESS and (deployment.get("user_config") or {}).get("weights"):
            weights = deployment["user_config"]["weights"]
            return {v["name"]: float(weights.get(v["name"], 0.0)) for v in args["variants"]}
    return {v["name"]: float(v["weight"]) for v in args["variants"]}


def with_canary_weight(weights: dict[str, float], canary: str, share: float) -> dict[str, float]:
    """``canary`` gets ``share`` of the traffic; the others split the rest in their current proportions."""
    others = {name: w for name, w in weights.items() if name != canary}
    total = sum(others.values())
    if total <= 0:
        raise CanaryError("no variant other than the canary takes traffic: there is no production to compare with")
    scaled = {name: round((1 - share) * w / total, 6) for name, w in others.items()}
    return {**scaled, canary: share}


def set_ingress_weights(config: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    """``config`` with the ingress's user_config weights replaced (its other deployment options kept)."""
    config = copy.deepcopy(config)
    deployments = [d for d in config.get("deployments") or [] if d.get("name") != INGRESS]
    ingress = next((d for d in config.get("deployments") or [] if d.get("name") == INGRESS), {"name": INGRESS})
    deployments.append({**ingress, "user_config": {**(ingress.get("user_config") or {}), "weights": weights}})
    config["deployments"] = deployments
    return config


def deploy_body(details: dict[str, Any], app: str, config: dict[str, Any]) -> dict[str, Any]:
    """The PUT body: every application deployed from a config, ``app``'s replaced by (or added as) ``config`` (a PUT
    without an application deletes it), and the running HTTP options."""
    applications = [
        found["deployed_app_config"]
        for name, found in (details.get("applications") or {}).items()
        if name != app and found.get("deployed_app_config")
    ]
    body: dict[str, Any] = {"applications": [*applications, config]}
    http = details.get("http_options") or {}
    if http:
        body["http_options"] = {key: http[key] for key in ("host", "port", "request_timeout_s") if key in http}
    return body


# ---------------------------------------------------------------- talking to the dashboard


def _details(dashboard: str) -> dict[str, Any]:
    import httpx

    from chatforge.jobs import auth_headers  # a Ray with token auth (a local Ray 2.60's default) refuses without it

    try:
        response = httpx.get(dashboard.rstrip("/") + APPLICATIONS_PATH, headers=auth_headers(), timeout=30)
    except httpx.HTTPError as error:
        raise CanaryError(f"the Ray dashboard at {dashboard} cannot be reached: {error}") from None
    if response.status_code != 200:
        raise CanaryError(
            f"GET {APPLICATIONS_PATH} at {dashboard} answered {response.status_code}{refusal_hint(response)}"
        )
    return response.json()


def refusal_hint(response: Any) -> str:
    """What to do about a dashboard that refused the request for want of Ray's token; empty otherwise."""
    if response.status_code not in (401, 403):
        return ""
    return (
        ": the cluster has token authentication on; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token where "
        "this runs"
    )


def _put(dashboard: str, body: dict[str, Any]) -> None:
    import httpx

    from chatforge.jobs import auth_headers

    response = httpx.put(dashboard.rstrip("/") + APPLICATIONS_PATH, json=body, headers=auth_headers(), timeout=60)
    if response.status_code != 200:
        raise CanaryError(
            f"PUT {APPLICATIONS_PATH} at {dashboard} answered {response.status_code}{refusal_hint(response)}: "
            f"{response.text[:300]}"
        )


def wait_running(dashboard: str, app: str, variant: str | None, timeout_s: float, since: float) -> None:
    """Until ``app`` runs the config put at ``since`` (and ``variant``'s replicas are healthy); CanaryError when it
    fails to deploy or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    status, message = "unknown", ""
    while time.monotonic() < deadline:
        found = (_details(dashboard).get("applications") or {}).get(app) or {}
        status, message = found.get("status", "unknown"), found.get("message", "")
        deployments = found.get("deployments") or {}
        if status == "DEPLOY_FAILED":
            raise CanaryError(f"Serve could not deploy {app!r}: {message}")
        fresh = found.get("last_deployed_time_s", 0) >= since - 1
        healthy = variant is None or (deployments.get(variant) or {}).get("status") == "HEALTHY"
        if status == "RUNNING" and fresh and healthy:
            return
        time.sleep(1.0)
    raise CanaryError(f"{app!r} was not running the new config after {timeout_s:g} s (status {status}: {message})")


def deploy_app(dashboard: str, app: str, args: dict[str, Any], timeout_s: float) -> None:
    """Deploy ``build_app(args)`` as the application ``app`` on route ``/`` from a Serve config, through the
    dashboard's REST API (as `serve deploy` does), so that canaries can be added to it later; returns once it runs.
    Serve must have been started with the HTTP options wanted (``serve.start``): the PUT keeps the running ones."""
    config = {"name": app, "route_prefix": "/", "import_path": BUILD_APP, "args": args}
    started = time.time()
    _put(dashboard, deploy_body(_details(dashboard), app, config))
    wait_running(dashboard, app, None, timeout_s, started)


def deploy_canary(
    dashboard: str, app: str, canary: str, model_dir: str, share: float, production: str | None, timeout_s: float
) -> Change:
    """Add ``model_dir`` as the variant ``canary`` with ``share`` of the traffic, its serving options copied from
    ``production`` (None: the first variant); returns once Serve runs it."""
    details = _details(dashboard)
    config = app_config(details, app)
    args = serve_args(config)
    names = [v["name"] for v in args["variants"]]
    if canary in names:
        raise CanaryError(f"{app!r} already has a variant named {canary!r}")
    production = production or names[0]
    if production not in names:
        raise CanaryError(f"loop.canary.production: {production!r} is not among the variants {names}")
    template = next(v for v in args["variants"] if v["name"] == production)
    args["variants"].append({**template, "name": canary, "model": model_dir, "weight": 0.0})
    weights = with_canary_weight(current_weights(config, args), canary, share)
    config = set_ingress_weights({**config, "args": args}, weights)
    started = time.time()
    _put(dashboard, deploy_body(details, app, config))
    wait_running(dashboard, app, canary, timeout_s, started)
    return Change("deploy", app, canary, production, weights, started, f"{share:g} of the traffic", model_dir)


def shifted(weights: dict[str, float], source: str, target: str) -> dict[str, float]:
    """``source``'s traffic moved to ``target``; the other variants keep theirs."""
    moved = dict(weights)
    moved[target] = moved.get(target, 0.0) + moved.get(source, 0.0)
    moved[source] = 0.0
    return moved


def move_traffic(dashboard: str, app: str, source: str, target: str, timeout_s: float) -> dict[str, float]:
    """All of ``source``'s traffic to ``target`` through the ingress's weights, nothing else changed (a reconfigure
    of the running replicas); returns the new weights."""
    details = _details(dashboard)
    config = app_config(details, app)
    args = serve_args(config)
    names = {v["name"] for v in args["variants"]}
    unknown = sorted({source, target} - names)
    if unknown:
        raise CanaryError(f"{app!r} has no variants named {unknown}")
    weights = shifted(current_weights(config, args), source, target)
    started = time.time()
    _put(dashboard, deploy_body(details, app, set_ingress_weights(config, weights)))
    wait_running(dashboard, app, None, timeout_s, started)
    return weights


# ---------------------------------------------------------------- the decision


def variant_ratings(engine: sa.Engine, variants: list[str], since: float) -> dict[str, tuple[int, int]]:
    """(positive ratings, all non-zero ratings) per variant, of ratings given since ``since`` (unix seconds)."""
    from chatforge.serve.feedback import completions, feedback

    query = (
        sa.select(completions.c.variant, feedback.c.rating, sa.func.count())
        .select_from(feedback.join(completions, completions.c.id == feedback.c.completion_id))
        .where(completions.c.variant.in_(variants), feedback.c.created >= since, feedback.c.rating != 0)
        .group_by(completions.c.variant, feedback.c.rating)
    )
    counts = {name: [0, 0] for name in variants}
    with engine.connect() as connection:
        for variant, rating, n in connection.execute(query):
            counts[variant][1] += n
            if rating > 0:
                counts[variant][0] += n
    return {name: (positive, total) for name, (positive, total) in counts.items()}


def decide(
    dashboard: str,
    engine: sa.Engine,
    live: Change,
    alpha: float,
    min_ratings: int,
    timeout_s: float,
) -> Change:
    """Promote, roll back or keep waiting on the canary ``live`` deployed, by its ratings against production's since
    then; a promotion or rollback moves the traffic."""
    from chatforge.continual.stats import compare_variants

    counts = variant_ratings(engine, [live.canary, live.production], live.at)
    verdict = compare_variants(counts[live.canary], counts[live.production], alpha=alpha, min_ratings=min_ratings)
    reason = (
        f"{verdict.reason}; canary {counts[live.canary][0]}/{counts[live.canary][1]} positive, production "
        f"{counts[live.production][0]}/{counts[live.production][1]}"
    )
    if verdict.decision == "wait":
        return Change("wait", live.app, live.canary, live.production, live.weights, time.time(), reason, live.model)
    source, target = (live.production, live.canary) if verdict.decision == "promote" else (live.canary, live.production)
    moved = move_traffic(dashboard, live.app, source, target, timeout_s)
    return Change(verdict.decision, live.app, live.canary, live.production, moved, time.time(), reason, live.model)


# ---------------------------------------------------------------- across cycles


def live_canary(history: list[dict[str, Any]]) -> Change | None:
    """The canary a committed cycle deployed and no later one promoted or rolled back (``watermark.cycles`` rows)."""
    live = None
    for row in history:
        record = row.get("record") or {}
        decision, deployment = record.get("canary"), record.get("deployment")
        if decision and decision.get("action") in ("promote", "rollback"):
            live = None
        if deployment and deployment.get("action") == "deploy" and not deployment.get("error"):
            live = Change(**{key: deployment[key] for key in Change.__dataclass_fields__ if key in deployment})
    return live


def promoted_model(history: list[dict[str, Any]]) -> str | None:
    """The model dir of the last canary promoted, which later cycles fine-tune from and gate against."""
    promoted = None
    for row in history:
        decision = (row.get("record") or {}).get("canary") or {}
        if decision.get("action") == "promote":
            promoted = decision.get("model")
    return promoted


def canary_step(
    spec: CanarySpec,
    engine: sa.Engine,
    history: list[dict[str, Any]],
    cycle: int,
    passed: bool,
    candidate: str,
    say: Callable[[str], None],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A cycle's end with ``spec.dashboard`` set: decide on the live canary, if any; then, when the candidate passed
    the gate and no canary is still being compared, deploy it as the next one. Returns (decision, deployment) as
    cycle.json records them; a deployment that fails is recorded with its ``error``."""
    decision = None
    live = live_canary(history)
    if live is not None:
        say(f"canary {live.canary}: comparing its ratings with {live.production}'s")
        decision = decide(spec.dashboard, engine, live, spec.alpha, spec.min_ratings, spec.timeout_s).as_dict()
        if decision["action"] == "wait":  # one canary at a time
            return decision, None
    if not passed:
        return decision, None
    name = f"candidate-{cycle:04d}"
    say(f"deploying the candidate as the canary {name} ({spec.share:.0%} of the traffic)")
    try:
        change = deploy_canary(spec.dashboard, spec.app, name, candidate, spec.share, spec.production, spec.timeout_s)
    except CanaryError as error:
        return decision, {"action": "deploy", "app": spec.app, "canary": name, "model": candidate, "error": str(error)}
    return decision, change.as_dict()
