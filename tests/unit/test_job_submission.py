"""The pure parts of `chatforge.jobs`: where the cluster and its token come from, and what a job carries."""

from __future__ import annotations

import shlex

import pytest

from chatforge.config import RaySpec
from chatforge.jobs import JobsError, auth_token, dashboard_address, entrypoint, job_env, runtime_env
from chatforge.runtime import RayConnectError, init_ray


def test_the_address_comes_from_the_flag_else_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert dashboard_address("http://flag-head:8265") == "http://flag-head:8265"
    assert dashboard_address(None) == "http://env-head:8265"
    assert dashboard_address("head:8265") == "http://head:8265"
    with pytest.raises(JobsError, match="not ray://"):
        dashboard_address("ray://head:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(JobsError, match="--address http://HEAD:8265.*RAY_ADDRESS"):
        dashboard_address(None)


def test_the_token_comes_from_the_env_then_its_file_then_the_home_file(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_token() is None
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"


def test_the_entrypoint_is_the_local_command_with_its_arguments_quoted(tmp_path):
    args = ["curate.sources=[{name: a, path: 'x y.jsonl'}]", "--data", "s3://bucket/curated"]
    line = entrypoint("train", "spec.yaml", args)
    assert shlex.split(line) == ["python", "-m", "chatforge.cli", "train", "spec.yaml", *args]
    env = runtime_env(str(tmp_path), with_package=True)
    assert env["working_dir"] == str(tmp_path) and env["py_modules"][0].endswith("chatforge")
    assert env["env_vars"] == job_env() and job_env()["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"
    assert "py_modules" not in runtime_env(str(tmp_path), with_package=False)


def test_a_local_command_refuses_a_dashboard_address_with_what_to_do(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(RayConnectError, match="chatforge submit.*ray.address=HEAD:6379"):
        init_ray(RaySpec())
