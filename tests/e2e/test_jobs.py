"""`chatforge submit`, `status` and `logs` against a real Ray head (`ray start --head` on 127.0.0.1) with token
authentication on: a curation job runs on the cluster and its log comes back; a failing job makes `--wait` exit 1;
a client without the token (or with a wrong one) is refused with what to do."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from helpers.corpus import write_sharegpt_jsonl
from helpers.ray_head import ray_head

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(32)
    with ray_head(num_cpus=2, token=token) as started:
        yield started, token


def chatforge(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def client_env(tmp_path, token: str | None) -> dict[str, str]:
    """A client's environment: its own HOME (no ~/.ray/auth_token of this machine's other Rays), the token if any."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env |= {"HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


def test_a_curation_job_runs_on_the_cluster_and_its_log_comes_back(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    cluster, token = head
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "curated"
    write_sharegpt_jsonl(corpus, 60)
    env = client_env(tmp_path, token)
    source = f"curate.sources=[{{name: small, format: sharegpt, path: '{corpus}'}}]"
    result = chatforge(
        "submit",
        "curate",
        "pipelines/quickstart.yaml",
        source,
        "--output",  # the command's own option, passed through
        str(out),
        "--address",
        cluster.dashboard,
        "--wait",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("chatforge-curate-") and f"{cluster.dashboard}/#/jobs/{job_id}" in result.stderr
    assert "records" in result.stdout and "SUCCEEDED" in result.stderr  # the job's log, then its table
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_records"] == 60 and manifest["kept"] > 0

    # the runtime_env carried the spec, this chatforge and the environment a local Ray gets
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {token}"})
    info = client.get_job_info(job_id)
    assert info.entrypoint.startswith("python -m chatforge.cli curate quickstart.yaml")
    assert info.runtime_env["env_vars"]["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"
    assert info.runtime_env["py_modules"] and info.runtime_env["working_dir"]

    status = chatforge("status", job_id, "--address", cluster.dashboard, env=env)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED", status.stderr
    logs = chatforge("logs", job_id, env={**env, "RAY_ADDRESS": cluster.dashboard})  # the address from RAY_ADDRESS
    assert logs.returncode == 0 and "kept" in logs.stdout and "input" in logs.stdout


def test_a_failing_job_makes_wait_exit_1_with_its_error(head, tmp_path):
    cluster, token = head
    source = f"curate.sources=[{{name: gone, format: sharegpt, path: '{tmp_path / 'nowhere.jsonl'}'}}]"
    result = chatforge(
        "submit", "curate", "pipelines/quickstart.yaml", source, "--address", cluster.dashboard, "--wait",
        env=client_env(tmp_path, token),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "nowhere.jsonl" in result.stdout  # the command's own error, in the job's log
    assert "FAILED" in result.stderr and "failed" in result.stderr


def test_a_client_without_the_token_is_refused_with_what_to_do(head, tmp_path):
    cluster, _ = head
    for token in (None, "not-the-token"):
        result = chatforge(
            "status", "chatforge-curate-x", "--address", cluster.dashboard, env=client_env(tmp_path, token)
        )
        assert result.returncode == 2, result.stderr
        assert "token authentication" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr, result.stderr
    submitted = chatforge(
        "submit", "curate", "pipelines/quickstart.yaml", "--address", cluster.dashboard,
        env=client_env(tmp_path, None),
    )  # fmt: skip
    assert submitted.returncode == 2 and "refused" in submitted.stderr and not submitted.stdout


def test_the_dashboards_serve_api_takes_the_token(head, tmp_path, monkeypatch):
    """`chatforge serve --via-dashboard` and the loop's canaries talk to the dashboard's Serve REST API: with the
    cluster's token they are let in, without it they say what to set."""
    from chatforge.continual.canary import CanaryError, _details

    cluster, token = head
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine's other Rays
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(CanaryError, match="answered 401: the cluster has token authentication on; set RAY_AUTH_TOKEN"):
        _details(cluster.dashboard)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert "applications" in _details(cluster.dashboard)
