"""Autoscaling: a variant goes 1 -> 2 replicas under concurrent load and back to 1 after it (fast settings)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from helpers.network import free_port
from helpers.tiny_model import save_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["chatforge"].deployments["tiny"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_replicas_follow_the_load(tmp_path):
    import ray
    from ray import serve

    from chatforge.serve.app import build_app

    model = save_tiny_model(tmp_path / "model")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "variants": [
                {
                    "name": "tiny",
                    "model": str(model),
                    "num_cpus": 0.5,
                    "max_ongoing_requests": 16,
                    "engine": {"max_batch_size": 8, "default_max_tokens": 64},
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 2,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 2,
                        "look_back_period_s": 2,
                        "metrics_interval_s": 0.5,
                    },
                }
            ],
            "guard": {"input_policy": "off", "output_policy": "off"},
            "auth": {"anonymous": True},  # no keys: allowed on this 127.0.0.1 bind only
            "feedback": {"url": f"sqlite:///{tmp_path / 'feedback.db'}", "url_env": None},
            "ingress_num_cpus": 0.25,
        }
        serve.run(build_app(args), name="chatforge", route_prefix="/")
        assert running_replicas() == 1

        stop, failures, served = threading.Event(), [], []

        def load() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                while not stop.is_set():
                    body = {"messages": [{"role": "user", "content": "tell me about rivers"}], "max_tokens": 64}
                    response = client.post("/v1/chat/completions", json=body)
                    (served if response.status_code == 200 else failures).append(response.status_code)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(24)]
        for thread in threads:
            thread.start()
        try:
            scaled_up = wait_for(lambda: running_replicas() == 2, 90)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        assert scaled_up, "no second replica within 90 s of load"
        assert not failures and served
        assert wait_for(lambda: running_replicas() == 1, 90), "did not scale back to 1 replica within 90 s"
    finally:
        serve.shutdown()
        ray.shutdown()
