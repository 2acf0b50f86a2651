"""The A/B split is the ingress's user_config: a config deploy that changes only it moves traffic to a canary with
no replica restarted and no request failed."""

import threading
import time
from collections import Counter

import httpx
import pytest
import yaml

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


def test_a_weight_change_reconfigures_the_running_ingress_without_losing_a_request(tmp_path):
    import ray
    from ray import serve

    model = str(save_tiny_model(tmp_path / "model"))
    port, dashboard = free_port(), free_port()
    engine = {"default_max_tokens": 4, "max_tokens_limit": 8}
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "chatforge",
                "route_prefix": "/",
                "import_path": "chatforge.serve.app:build_app",
                "args": {
                    "variants": [
                        {"name": "main", "model": model, "weight": 1, "num_cpus": 0.4, "engine": engine},
                        {"name": "canary", "model": model, "weight": 0, "num_cpus": 0.4, "engine": engine},
                    ],
                    "auth": {"anonymous": True},
                    "feedback": {"url": f"sqlite:///{tmp_path / 'feedback.db'}"},
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
        api = f"http://127.0.0.1:{dashboard}/api/serve/applications/"
        url = f"http://127.0.0.1:{port}"

        def deploy(weights: dict | None) -> None:
            body = yaml.safe_load(yaml.safe_dump(config))
            if weights is not None:
                body["applications"][0]["deployments"] = [
                    {"name": "chatforge-ingress", "user_config": {"weights": weights}}
                ]
            response = httpx.put(api, json=body, timeout=60)
            assert response.status_code == 200, response.text

        def answered_by(user: str) -> str:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": user}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["model"]

        deploy(None)
        wait_for(lambda: healthy(url), "the app's start")
        created = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["created"]
        assert {answered_by(f"user-{i}") for i in range(6)} == {"main"}  # the canary has weight 0

        statuses: list[int] = []
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
            deploy({"main": 0, "canary": 1})
            wait_for(lambda: answered_by("someone") == "canary", "the move of traffic to the canary", 60)
            time.sleep(2)  # traffic keeps flowing after the change, too
        finally:
            stop.set()
            sender.join(timeout=70)
        assert statuses and set(statuses) == {200}, Counter(statuses)
        # the same ingress replica (its start time) took the change: a reconfigure, not a restart
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["created"] == created
        assert {answered_by(f"user-{i}") for i in range(6)} == {"canary"}
    finally:
        serve.shutdown()
        ray.shutdown()
