"""Joining or starting Ray for a command, with a clear error instead of a silent hang."""

from __future__ import annotations

import logging
import os
import threading

from chatforge.config import RaySpec

logger = logging.getLogger(__name__)


def fix_ray_data_first_limits() -> bool:
    """Keep Ray Data from running each execution's first second on one task (Ray 2.60; docs/ray-data-limits.md).

    An execution learns the cluster's size from its autoscaling coordinator, whose client answers from a cache and
    asks the coordinator actor in the background: its first answer is empty. The resource manager turns that into
    limits of zero CPUs and keeps them for a second (``GLOBAL_LIMITS_UPDATE_INTERVAL_S``), so every execution runs
    one task (the one its liveness rule lets through) until then: on a 2-CPU Ray, four 2 s tasks take 5.3 s instead
    of 4. Patched: limits that are all zero (no CPU, GPU nor object store, which no real cluster has) are not kept,
    so the next scheduling step asks again, and until the coordinator answers (its actor starts during a job's first
    execution, ~1 s) the limits come from the whole cluster (`_cluster_limits`). Idempotent; a no-op (with a debug
    line) when Ray Data's internals are not as expected. Returns whether the patch is in place."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # pragma: no cover - Ray Data not installed
        return False
    original = ResourceManager.get_global_limits
    if getattr(original, "chatforge_patched", False):
        return True
    if not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        logger.debug("Ray Data's ResourceManager has no limits cache here; not patched")
        return False

    def get_global_limits(self):
        limits = original(self)
        if not (limits.cpu or limits.gpu or limits.object_store_memory):
            self._global_limits_last_update_time = 0  # not an answer yet: ask again next time
            fallback = _cluster_limits(self)
            if fallback is not None:
                return fallback
        return limits

    get_global_limits.chatforge_patched = True
    get_global_limits.chatforge_original = original
    ResourceManager.get_global_limits = get_global_limits
    return True


def _cluster_limits(manager):
    """A resource manager's limits computed from the whole cluster (``ray.cluster_resources()``), as Ray Data did
    before its autoscaling coordinator, while the coordinator has not answered yet (its actor is still starting
    during the first execution of a job); None without a connected Ray."""
    import ray
    from ray.data._internal.execution.interfaces import ExecutionResources

    if not ray.is_initialized():
        return None
    total = ExecutionResources.from_resource_dict(ray.cluster_resources())
    total = total.copy(
        object_store_memory=(total.object_store_memory or 0) * manager._object_store_memory_limit_fraction
    )
    options = manager._options
    return options.resource_limits.min(total).subtract(options.exclude_resources).max(ExecutionResources.zero())


class RayConnectError(RuntimeError):
    """Ray could not be started or joined; the message says what to check."""


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to (1 if it reports none): what the data steps size
    their read ranges, shuffle partitions and scorer pool by."""
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


def init_ray(spec: RaySpec, idle_workers_per_cpu: int = 2) -> None:
    """Start a local Ray (``spec.address`` unset) or join a cluster; reuse Ray if this process already has it.

    ``idle_workers_per_cpu``: how many idle worker processes a local Ray keeps per CPU for the next task. Curation
    wants 2 (see below); training wants 0: after tokenizing and packing, an idle worker only costs the training
    workers CPU (each Ray process wakes 100 times a second, ~1% of a core; docs/benchmarks.md).

    Joining a token-authenticated cluster without the token retries forever inside ``ray.init``, so the join runs
    in a daemon thread with a deadline.
    """
    import ray

    fix_ray_data_first_limits()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not spec.address:
        # Ray Data's keyed shuffles run in worker pools of their own; with the default soft limit (one worker per CPU)
        # every switch between a map and a shuffle starts fresh Python workers, seconds each on small machines. Two
        # per CPU keep them; more only keep more idle workers, each holding 130-360 MB, which are the largest part
        # of the 4x curation run's peak memory (docs/benchmarks.md).
        cpus = spec.num_cpus or os.cpu_count() or 1
        os.environ.setdefault("RAY_num_workers_soft_limit", str(idle_workers_per_cpu * max(2, cpus)))
        # Ray Train's report queue is polled at this interval; the 2 s default throttles small runs (docs/training.md).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # Arrow's default allocator, mimalloc, keeps what a task freed: after the curation benchmark's 4x input the
        # idle workers hold 1.8 GB of heap with it and 0.85 GB with jemalloc, which hands freed pages back to the OS.
        # Workers of a local Ray inherit this; on a cluster, set it in the nodes' environment (docs/curation.md).
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
        # Ray's log monitor globs the session's log dir for new files every 0.1 s while it has fewer files than this,
        # else every 0.5 s: 0.5% of a core on an idle 2-CPU Ray instead of 1.2% (and 2.3-3.1% beside training). A
        # new worker's first lines reach the driver up to 0.5 s later; known files are still read every 0.1 s.
        os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
    if not spec.address:
        # In this thread: Ray ties the processes it starts to the life of the thread that started them.
        try:
            ray.init(num_cpus=spec.num_cpus, dashboard_host="127.0.0.1")
        except Exception as err:
            raise RayConnectError(f"could not start a local Ray: {err}") from err
        return
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=spec.address)
        except BaseException as err:  # reported to the caller below
            failure.append(err)

    # Joining only (no processes are started), so a daemon thread with a deadline is safe here.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(spec.connect_timeout_s)
    if thread.is_alive():
        raise RayConnectError(
            f"could not join Ray at {spec.address} within {spec.connect_timeout_s:g}s: check the address, that the "
            "cluster is up, and, with token auth on, that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds its token"
        )
    if failure:
        raise RayConnectError(f"could not join Ray at {spec.address}: {failure[0]}") from failure[0]
