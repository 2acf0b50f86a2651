"""A real Ray head on 127.0.0.1 (`ray start --head`), with its own temp dir and ports, stopped by its processes'
PIDs: the machine's other Rays are left alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers.network import free_port


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:PORT, what `chatforge submit --address` takes
    gcs: str  # 127.0.0.1:PORT, what ray.init(address=...) takes
    temp_dir: str
    env: dict[str, str]  # the environment it was started with (its token, if any)


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(temp_dir: str) -> None:
    """SIGTERM every process whose command line names ``temp_dir`` (the head's own), SIGKILL what is left."""
    processes = _processes_of(temp_dir)
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def ray_head(num_cpus: int = 2, token: str | None = None) -> Iterator[Head]:
    """A head with its dashboard on 127.0.0.1; token authentication on when ``token`` is given."""
    temp_dir = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token" if token else "disabled"}
    env.pop("RAY_ADDRESS", None)
    # a node's `python` is the one chatforge is installed in (the cluster image's; here, this venv's)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if token:
        env["RAY_AUTH_TOKEN"] = token
    gcs, dashboard = free_port(), free_port()
    workers = free_port()
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 200}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(argv, env=env, check=True, timeout=180, capture_output=True)
        _wait_dashboard(f"http://127.0.0.1:{dashboard}", token)
        yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir, env)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_dashboard(url: str, token: str | None, timeout_s: float = 90.0) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the head's dashboard at {url} did not answer within {timeout_s:g} s")
