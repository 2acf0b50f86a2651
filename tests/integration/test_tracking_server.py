"""chatforge.tracking against a real `mlflow server` on 127.0.0.1: a remote tracking URI works like the local one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import mlflow
import pytest

from chatforge.config import load_spec
from chatforge.tracking import command_run

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "art"),
    ]
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # the child keeps its own descriptor
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
    else:
        process.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_a_command_run_lands_on_a_tracking_server(server, tmp_path):
    spec = load_spec(None, [f"tracking.uri={server}", "tracking.experiment=remote"])
    report = tmp_path / "report.json"
    report.write_text("{}")
    with command_run(spec, "eval") as run:
        run.metrics({"perplexity": 33.0})
        run.artifact(str(report))
    client = mlflow.MlflowClient(server)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["perplexity"] == 33.0
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.json", "spec.yaml"]
