"""Joining or starting Ray for a command, with a clear error instead of a silent hang."""

from __future__ import annotations

import os
import threading

from chatforge.config import RaySpec


class RayConnectError(RuntimeError):
    """Ray could not be started or joined; the message says what to check."""


def init_ray(spec: RaySpec) -> None:
    """Start a local Ray (``spec.address`` unset) or join a cluster; reuse Ray if this process already has it.

    Joining a token-authenticated cluster without the token retries forever inside ``ray.init``, so the join runs
    in a daemon thread with a deadline.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"address": spec.address} if spec.address else {"num_cpus": spec.num_cpus, "dashboard_host": "127.0.0.1"}
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as err:  # reported to the caller below
            failure.append(err)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(spec.connect_timeout_s)
    if thread.is_alive():
        raise RayConnectError(
            f"could not join Ray at {spec.address} within {spec.connect_timeout_s:g}s: check the address, that the "
            "cluster is up, and, with token auth on, that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds its token"
        )
    if failure:
        where = spec.address or "a local Ray"
        raise RayConnectError(f"could not start or join {where}: {failure[0]}") from failure[0]
