"""A canary on a running app, through the dashboard's REST API as `chatforge loop` does it (chatforge.continual.canary):
deploying it adds a variant with its share of the traffic, and promoting it on its ratings moves all traffic to it by
the ingress's user_config alone (a reconfigure: no replica restarted). Requests flow throughout and none fails."""

import threading
import time
from collections import Counter

import httpx
import pytest

from helpers.network import free_port
from helpers.tiny_model import save_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(check, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s:.0f} s"
        time.sleep(1)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_canary_is_deployed_rated_and_promoted_on_the_running_app_without_losing_a_request(tmp_path):
    import ray
    import sqlalchemy as sa
    from ray import serve

    from chatforge.continual.canary import decide, deploy_canary

    model = str(save_tiny_model(tmp_path / "model"))
    candidate = str(save_tiny_model(tmp_path / "candidate"))
    port, dashboard = free_port(), free_port()
    engine = {"default_max_tokens": 4, "max_tokens_limit": 8}
    store = f"sqlite:///{tmp_path / 'feedback.db'}"
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "chatforge",
                "route_prefix": "/",
                "import_path": "chatforge.serve.app:build_app",
                "args": {
                    "variants": [{"name": "main", "model": model, "num_cpus": 0.4, "engine": engine}],
                    "auth": {"anonymous": True},
                    "feedback": {"url": store, "url_env": None},
                    "ingress_num_cpus": 0.2,
                },
            }
        ],
    }
    ray.init(
        num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard, log_to_driver=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rest = f"http://127.0.0.1:{dashboard}"
        url = f"http://127.0.0.1:{port}"

        def answer(user: str, model_name: str | None = None) -> dict:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": user}
            if model_name:
                body["model"] = model_name
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()

        response = httpx.put(f"{rest}/api/serve/applications/", json=config, timeout=60)
        assert response.status_code == 200, response.text
        wait_for(lambda: healthy(url), "the app's start")
        assert {answer(f"user-{i}")["model"] for i in range(6)} == {"main"}

        statuses: list[int | str] = []
        stop = threading.Event()

        def traffic() -> None:
            body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
            while not stop.is_set():
                try:
                    statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)
                except httpx.HTTPError as err:
                    statuses.append(type(err).__name__)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            live = deploy_canary(rest, "chatforge", "canary", candidate, 0.5, None, timeout_s=180)
            assert live.production == "main" and live.weights == {"main": 0.5, "canary": 0.5}
            assert {answer(f"user-{i}")["model"] for i in range(16)} == {"main", "canary"}  # sticky, split by user
            created = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["created"]

            # the canary's answers are liked, production's are not: significant at min_ratings=6
            for i in range(6):
                for variant, rating in (("canary", 1), ("main", -1)):
                    completion = answer(f"rater-{i}", variant)
                    rated = httpx.post(
                        f"{url}/v1/feedback", json={"completion_id": completion["id"], "rating": rating}, timeout=30
                    )
                    assert rated.status_code == 200, rated.text
            database = sa.create_engine(store)
            wait_for(
                lambda: database.connect().execute(sa.text("SELECT count(*) FROM feedback")).scalar() == 12,
                "the ratings' writes",
                60,
            )
            decision = decide(rest, database, live, alpha=0.05, min_ratings=6, timeout_s=180)
            assert decision.action == "promote", decision.reason
            assert decision.weights == {"main": 0.0, "canary": 1.0}
            wait_for(lambda: answer("someone")["model"] == "canary", "the move of traffic to the canary", 60)
            time.sleep(2)  # traffic keeps flowing after the change, too
        finally:
            stop.set()
            sender.join(timeout=70)
        assert statuses and set(statuses) == {200}, Counter(statuses)
        # the same ingress replica (its start time) took the promotion: a reconfigure, not a restart
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["created"] == created
        assert {answer(f"user-{i}")["model"] for i in range(6)} == {"canary"}
    finally:
        serve.shutdown()
        ray.shutdown()
