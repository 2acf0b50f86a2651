"""A chatforge command run on a Ray cluster as a Ray Job, through Ray's Job Submission SDK.

`chatforge submit train SPEC [args]` runs on the cluster what `chatforge train SPEC [args]` runs locally: the job's
entrypoint is that command, and its runtime_env carries

- the spec file (the job's working_dir holds it and nothing else, so nothing else of the client's directory is
  uploaded; the spec's relative paths are taken from that directory on the node that runs the job, so outputs belong
  on shared storage: ``/mnt/shared/...`` or ``s3://...``);
- the chatforge package of the client (``py_modules``), so the cluster runs the code that was submitted; the
  cluster's image provides its dependencies (``--no-package`` runs the image's own chatforge instead);
- the environment a local Ray gets from `chatforge.runtime.init_ray` that a job's own processes read
  (``ARROW_DEFAULT_MEMORY_POOL``, Ray Train's report polling); the raylet's knobs belong in the nodes' environment
  (cluster/).

The cluster is the dashboard's HTTP address: ``--address``, else ``RAY_ADDRESS``, as with ``ray job submit``. With
token authentication on (``RAY_AUTH_MODE=token``), the token comes from ``RAY_AUTH_TOKEN``, else the file
``RAY_AUTH_TOKEN_PATH`` names, else ``~/.ray/auth_token``, and goes with every request as a bearer header.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMANDS = ("curate", "train", "tune", "eval", "loop", "run")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The cluster cannot be reached or refuses the request; the message says what to do."""


def dashboard_address(address: str | None) -> str:
    """The cluster's dashboard URL: ``address``, else ``RAY_ADDRESS``; http:// unless a scheme is given."""
    found = address or os.environ.get("RAY_ADDRESS")
    if not found or found == "auto":
        raise JobsError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS to it"
        )
    if found.startswith("ray://"):
        raise JobsError(f"{found}: Ray Jobs go through the dashboard's HTTP address (http://HEAD:8265), not ray://")
    return found if "://" in found else f"http://{found}"


def auth_token() -> str | None:
    """Ray's auth token as the Ray CLI finds it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
    ``~/.ray/auth_token``; None when there is none."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = Path(os.environ.get(TOKEN_PATH_ENV) or DEFAULT_TOKEN_FILE).expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """Ray's auth token (`auth_token`) as the bearer header the dashboard's APIs take; empty without a token."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_env() -> dict[str, str]:
    """The env vars a job's processes get (`chatforge.runtime.init_ray` sets the same for a local Ray)."""
    from chatforge.compat import job_ray_env
    from chatforge.runtime import ARROW_ENV

    return {**ARROW_ENV, **job_ray_env()}


def entrypoint(command: str, spec_name: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", "chatforge.cli", command, spec_name, *args])


def runtime_env(spec_dir: str, with_package: bool) -> dict[str, Any]:
    import chatforge

    env: dict[str, Any] = {"working_dir": spec_dir, "env_vars": job_env()}
    if with_package:
        env["py_modules"] = [os.path.dirname(chatforge.__file__)]
    return env


class Jobs:
    """The Job Submission SDK's client for one cluster, with chatforge's errors."""

    def __init__(self, address: str | None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = dashboard_address(address)
        self.client = self._call(JobSubmissionClient, self.address, headers=auth_headers() or None)

    def _explain(self, error: BaseException) -> str:
        from ray.exceptions import AuthenticationError

        text = str(error)
        if isinstance(error, AuthenticationError) or any(code in text for code in ("401", "403")):
            return (
                f"the Ray cluster at {self.address} refused the request ({text.splitlines()[0][:200]}): it has token "
                f"authentication on; set {TOKEN_ENV} (or {TOKEN_PATH_ENV}, or ~/.ray/auth_token) to the cluster's "
                "token (`ray get-auth-token` on the head prints it)"
            )
        return f"cannot reach the Ray dashboard at {self.address}: {text.splitlines()[0][:300] if text else error!r}"

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import requests
        from ray.exceptions import RayError

        try:
            return fn(*args, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, RayError, requests.RequestException) as error:
            raise JobsError(self._explain(error)) from None

    def job_url(self, job_id: str) -> str:
        return f"{self.address.rstrip('/')}/#/jobs/{job_id}"

    def submit(self, command: str, spec: str, args: list[str], with_package: bool = True) -> str:
        """Submit ``chatforge COMMAND SPEC ARGS`` as a job; returns its submission id."""
        if command not in COMMANDS:
            raise JobsError(f"{command!r} cannot be submitted; choose one of: {', '.join(COMMANDS)}")
        if not os.path.isfile(spec):
            raise JobsError(f"{spec}: no such spec file")
        staged = tempfile.mkdtemp(prefix="chatforge-job-")
        try:
            name = os.path.basename(spec)
            shutil.copyfile(spec, os.path.join(staged, name))
            job_id = f"chatforge-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            return self._call(
                self.client.submit_job,
                entrypoint=entrypoint(command, name, args),
                submission_id=job_id,
                runtime_env=runtime_env(staged, with_package),
                metadata={"chatforge_command": command, "chatforge_spec": name},
            )
        finally:  # the SDK has uploaded the directory by the time submit_job returns
            shutil.rmtree(staged, ignore_errors=True)

    def info(self, job_id: str) -> JobInfo:
        details = self._call(self.client.get_job_info, job_id)
        return JobInfo(
            job_id=job_id,
            status=str(details.status.value if hasattr(details.status, "value") else details.status),
            entrypoint=details.entrypoint,
            message=details.message or "",
            start_time=details.start_time,
            end_time=details.end_time,
            url=self.job_url(job_id),
        )

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id)

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """The job's log as it grows (new text only), until the job ends."""
        shown = 0
        while True:
            done = self.info(job_id).status in FINAL  # asked before the logs, so nothing written at the end is missed
            text = self.logs(job_id)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            if done:
                return
            time.sleep(poll_s)


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str  # PENDING RUNNING SUCCEEDED FAILED STOPPED
    entrypoint: str
    message: str
    start_time: int | None  # ms since the epoch
    end_time: int | None
    url: str

    @property
    def seconds(self) -> float | None:
        if not self.start_time:
            return None
        return ((self.end_time or time.time() * 1000) - self.start_time) / 1000
