"""`chatforge serve` as a user runs it: a real process with its own Ray, HTTP in, SIGTERM out."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from test_cli_curate import chatforge

from helpers.network import free_port, wait_healthy
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("CHATFORGE_API_KEYS", None)


def write_spec(tmp_path) -> str:
    model = save_tiny_model(tmp_path / "model")
    spec = {
        "ray": {"num_cpus": 2},
        "serve": {
            "variants": [
                {
                    "name": "from-spec",
                    "model": "no/such/dir",  # --model replaces it
                    "num_cpus": 0.5,
                    "engine": {"default_max_tokens": 8, "max_tokens_limit": 32},
                }
            ],
            "feedback": {"url": f"sqlite:///{tmp_path / 'feedback.db'}", "url_env": None},
            "auth": {"anonymous": True},  # no keys: allowed on a loopback bind only
            "ingress_num_cpus": 0.25,
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path), str(model)


def test_serve_answers_then_stops_on_sigterm(tmp_path):
    spec, model = write_spec(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatforge.cli", "serve", spec, "--model", model, "--port", str(port)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "from-spec", "messages": [{"role": "user", "content": "hi there"}]},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 8
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        assert (tmp_path / "feedback.db").exists()
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-3000:]
        assert time.monotonic() - started < 60
        assert "from-spec" in stderr and f"{url}/v1" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_public_bind_without_keys_is_refused(tmp_path):
    spec, model = write_spec(tmp_path)
    result = chatforge("serve", spec, "--model", model, "--host", "0.0.0.0", timeout=120)
    assert result.returncode == 2
    assert "no API key is configured" in result.stderr
    # without keys, even loopback needs the spec to ask for anonymous access
    result = chatforge("serve", spec, "serve.auth.anonymous=false", "--model", model, timeout=120)
    assert result.returncode == 2
    assert "no API key is configured" in result.stderr and "anonymous: true" in result.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    spec, _ = write_spec(tmp_path)
    result = chatforge("serve", spec, timeout=120)
    assert result.returncode == 2
    assert "no/such/dir" in result.stderr and "config.json" in result.stderr


def test_serve_check_asks_rates_and_stops(tmp_path):
    import sqlite3

    spec, model = write_spec(tmp_path)
    port = str(free_port())
    # no keys and no anonymous access: the check asks with a one-off key of its own
    result = subprocess.run(
        [sys.executable, "-m", "chatforge.cli", "serve", spec, "serve.auth.anonymous=false", "--model", model]
        + ["--port", port, "--check"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each answer rated +1" in result.stderr and "from-spec" in result.stderr
    with sqlite3.connect(tmp_path / "feedback.db") as db:
        joined = db.execute("SELECT c.variant, f.rating FROM completions c JOIN feedback f ON f.completion_id = c.id")
        assert joined.fetchall() == [("from-spec", 1)]
