"""Ray Serve internals chatforge depends on, each in one place, failing closed, and canary-tested.

Ray Serve 2.60 has no public Python API for its HTTP options: ``serve.status()`` leaves them out and the REST API
that includes them (``GET /api/serve/applications/``) needs the dashboard. The bind address decides whether the
API may run without keys, so it is read from the controller here; any failure gives None, which refuses anonymous
access rather than assuming loopback. ``tests/integration/test_serve_app.py`` checks the answer against the host
the test started Serve with, so a Ray upgrade that changes these internals fails a test, not open.
"""

from __future__ import annotations

import logging

log = logging.getLogger("chatforge.serve")

HTTP_CONFIG_TIMEOUT_S = 10


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind, from the running Serve controller; None when it cannot be told."""
    import ray

    if not ray.is_initialized():  # no Serve to ask (and asking would start a Ray)
        return None
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        host = ray.get(client._controller.get_http_config.remote(), timeout=HTTP_CONFIG_TIMEOUT_S).host
    except Exception as error:  # Serve not running, or its internals changed: unknown, never a guess
        log.warning("cannot read the HTTP bind address from Ray Serve: %s", error)
        return None
    return host if isinstance(host, str) and host else None
