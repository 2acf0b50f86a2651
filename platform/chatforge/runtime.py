"""Joining or starting Ray for a command, with a clear error instead of a silent hang; and handing a worker's freed
heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from collections.abc import Callable

from chatforge.config import RaySpec

logger = logging.getLogger(__name__)


class RayConnectError(RuntimeError):
    """Ray could not be started or joined; the message says what to check."""


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to (1 if it reports none): what the data steps size
    their read ranges, shuffle partitions and scorer pool by."""
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


def cause_line(error: BaseException) -> str:
    """The innermost error as one line, "Type: its last message line": a worker's own exception, not the layers of
    Ray's wrapping (``RayTaskError.cause``, ``__cause__``) around it."""
    outer = error
    while True:
        inner = getattr(error, "cause", None)
        inner = inner if isinstance(inner, BaseException) else error.__cause__
        if inner is None:
            break
        error = inner
    if type(error).__name__ == "UserCodeException":  # Ray Data's wrapper: the UDF's own error is only in the text
        raised = udf_error_text(str(outer))
        if raised:
            return raised
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"


def udf_error_text(text: str) -> str | None:
    """ "Type: message" of the first exception in a Ray task's traceback text (the one the rest wrap), or None."""
    first = text.split("The above exception was the direct cause", 1)[0]
    lines = first.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]  # traceback frames are indented
    if not frames or frames[-1] + 1 >= len(lines):
        return None
    name, _, message = " ".join(line.strip() for line in lines[frames[-1] + 1 :]).partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message}" if message else None


# Arrow's allocator for every process that holds Ray Data blocks (`init_ray` sets it for a local Ray, a submitted
# job's runtime_env carries it): mimalloc, Arrow's default, keeps what a task freed; jemalloc hands it back.
ARROW_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}


def init_ray(spec: RaySpec, idle_workers_per_cpu: int = 2) -> str | None:
    """Start a local Ray (``spec.address`` unset) or join a cluster; reuse Ray if this process already has it.
    Returns the dashboard's URL when this call started or joined Ray and the cluster has one (None otherwise).

    ``idle_workers_per_cpu``: how many idle worker processes a local Ray keeps per CPU for the next task. Curation
    wants 2 (`chatforge.compat.local_ray_env` says why); training wants 0: after tokenizing and packing, an idle worker only costs the training
    workers CPU (each Ray process wakes 100 times a second, ~1% of a core; docs/benchmarks.md).

    Joining a token-authenticated cluster without the token retries forever inside ``ray.init``, so the join runs
    in a daemon thread with a deadline.
    """
    import ray

    from chatforge.compat import local_ray_env

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A Ray Job's driver (`chatforge submit`) finds its cluster in RAY_ADDRESS, as ray.init does
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise RayConnectError(
            f"{address} is a dashboard's HTTP address, which `chatforge submit` takes; to run this command on the "
            "cluster, submit it (`chatforge submit ...`), or join through its GCS address: ray.address=HEAD:6379"
        )
    if not address:
        # Ray's internal knobs: idle workers kept, Ray Train's report polling (chatforge.compat)
        for name, value in local_ray_env(int(spec.num_cpus or os.cpu_count() or 1), idle_workers_per_cpu).items():
            os.environ.setdefault(name, value)
        # Arrow's default allocator, mimalloc, keeps what a task freed; jemalloc hands freed pages back to the OS
        # (docs/benchmarks.md). Workers of a local Ray inherit this; a submitted job carries it in its runtime_env
        # (`chatforge.jobs`), and on a cluster the nodes' environment can set it too.
        for name, value in ARROW_ENV.items():
            os.environ.setdefault(name, value)
        # In this thread: Ray ties the processes it starts to the life of the thread that started them.
        port = {"dashboard_port": spec.dashboard_port} if spec.dashboard_port else {}
        try:
            context = ray.init(num_cpus=spec.num_cpus, dashboard_host="127.0.0.1", **port)
        except Exception as err:
            raise RayConnectError(f"could not start a local Ray: {err}") from err
        return _url(context.dashboard_url)
    failure: list[BaseException] = []
    contexts: list = []

    def connect() -> None:
        try:
            contexts.append(ray.init(address=address))
        except BaseException as err:  # reported to the caller below
            failure.append(err)

    # Joining only (no processes are started), so a daemon thread with a deadline is safe here.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(spec.connect_timeout_s)
    if thread.is_alive():
        raise RayConnectError(
            f"could not join Ray at {address} within {spec.connect_timeout_s:g}s: check the address, that the "
            "cluster is up, and, with token auth on, that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds its token"
        )
    if failure:
        raise RayConnectError(f"could not join Ray at {address}: {failure[0]}") from failure[0]
    return _url(contexts[0].dashboard_url)


def _url(dashboard: str | None) -> str | None:
    """``RayContext.dashboard_url`` ("host:port", or empty without a dashboard) as an http URL."""
    if not dashboard:
        return None
    return dashboard if "://" in dashboard else f"http://{dashboard}"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_heap() -> None:
    """Hand the pages freed Python objects leave in glibc's heaps back to the OS (``malloc_trim``; a no-op elsewhere).

    A batch of records as row dicts is many small and mid-sized objects; freed, they leave the heap fragmented, and
    glibc keeps its free pages until asked. A Ray worker runs batch after batch and then idles, so without this each
    worker keeps the heap of its largest batches (docs/benchmarks.md). Called after every record-step batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
