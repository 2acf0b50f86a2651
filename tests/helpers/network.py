"""Loopback ports for the servers tests and benchmarks start, and waiting for a server to answer."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path | None = None, timeout_s: float = 180) -> None:
    """Until ``url``/healthz answers 200; fails with the server's output (its ``log`` file, else its stderr) when it
    exits first or ``timeout_s`` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            output = log.read_text()[-3000:] if log else process.communicate()[1][-3000:]
            raise AssertionError(f"the server exited ({process.returncode}):\n{output}")
        assert time.monotonic() < deadline, f"no {url}/healthz within {timeout_s:g} s"
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
