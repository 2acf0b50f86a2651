"""The Ray Serve config files under serve/: valid for Serve and for chatforge, and `serve run` starts the app."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.network import free_port
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_config_is_valid_for_serve_and_chatforge(path):
    from ray.serve.schema import ServeDeploySchema

    from chatforge.serve.app import load_serve_spec

    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.parse_obj(config)  # what `serve run` / `serve deploy` / KubeRay check
    (app,) = schema.applications
    assert app.import_path == "chatforge.serve.app:build_app"
    spec = load_serve_spec(app.args)  # every key a ServeSpec field (a typo would raise, naming it)
    assert spec.variants and all(v.autoscaling.min_replicas <= v.autoscaling.max_replicas for v in spec.variants)
    assert path.read_text().startswith("# "), "each config starts with the command that runs it"


def test_production_config_keeps_secrets_in_env():
    config = yaml.safe_load((ROOT / "serve" / "production.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["auth"]["api_keys_env"] and args["feedback"]["url_env"]
    assert len(args["variants"]) == 2 and sum(v["weight"] for v in args["variants"]) == 100
    assert all(v["num_gpus"] >= 1 for v in args["variants"])
    assert "postgresql" not in args["feedback"]["url"]  # the Postgres URL (with its password) comes from the env


def test_serve_run_starts_the_quickstart_config(tmp_path):
    config = yaml.safe_load((ROOT / "serve" / "quickstart.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["variants"][0]["model"] = str(save_tiny_model(tmp_path / "model"))
    args["variants"][0]["engine"].update(default_max_tokens=8, max_tokens_limit=32)
    args["feedback"]["url"] = "sqlite:///feedback.db"  # relative: taken from the directory `serve run` starts in
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("CHATFORGE_API_KEYS", None)
    env.pop("CHATFORGE_FEEDBACK_URL", None)
    serve_cli = str(Path(sys.executable).parent / "serve")
    process = subprocess.Popen(
        [serve_cli, "run", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve run did not become healthy in 180 s"
            time.sleep(1)
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "chatforge-quickstart"
        assert (tmp_path / "feedback.db").exists()  # the relative SQLite URL landed where serve run started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: serve run shuts the app and its Ray down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
