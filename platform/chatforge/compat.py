"""Every place chatforge reaches past a library's public API, each gated on the versions it was checked against.

Each entry says what it does and why, what it buys (measured; docs/compat.md), and links the upstream issue or
change. Each checks every private name it touches before relying on it, and outside its checked versions, or
when a name is missing, it falls back to the library's own behaviour with a warning. ``tests/unit/test_compat.py``
holds a canary per entry that fails when upstream changes shape, so a version bump shows which entry to revisit.
``CHATFORGE_COMPAT_DISABLE=entry,entry`` turns the patches off (``all``: every one), leaving the library's own behaviour
(``cache_layers`` is a check the engine cannot do without, not a patch: it stays on):
the way to rule chatforge's patches out when something misbehaves, and how ``benchmarks/compat.py`` measures them.

| entry                        | library      | checked       | without it                                          |
| ---------------------------- | ------------ | ------------- | --------------------------------------------------- |
| `local_ray_env`              | ray          | 2.60          | a 20-step training run takes 72 s instead of 52 s   |
| `skip_deepspeed_shm_op`      | deepspeed    | 0.16-0.19     | training on CPU fails without a C++ compiler        |
| `block_refs`                 | ray          | 2.60          | dedup's shuffles can fail on empty blocks           |
| `cache_layers`               | transformers | 4.56-5.x      | no continuous batching (a clear error at start)     |
| `quiet_serve_batch_warning`  | ray          | 2.60          | a misleading warning in every replica's log         |
| `serve_http_host`            | ray          | 2.60          | anonymous serving is refused (the host is unknown)  |
"""

from __future__ import annotations

import logging
import os
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger("chatforge.compat")

CHECKED = {
    "local_ray_env": ("ray", ">=2.60,<2.61"),
    "skip_deepspeed_shm_op": ("deepspeed", ">=0.16,<0.20"),
    "block_refs": ("ray", ">=2.60,<2.61"),
    "cache_layers": ("transformers", ">=4.56,<6"),
    "quiet_serve_batch_warning": ("ray", ">=2.60,<2.61"),
    "serve_http_host": ("ray", ">=2.60,<2.61"),
}


@cache
def installed(distribution: str) -> Version | None:
    try:
        return Version(version(distribution))
    except PackageNotFoundError:
        return None


def disabled() -> set[str]:
    names = {name.strip() for name in os.environ.get("CHATFORGE_COMPAT_DISABLE", "").split(",") if name.strip()}
    if unknown := names - set(CHECKED) - {"all"}:
        log.warning("CHATFORGE_COMPAT_DISABLE names no entry %s; entries: %s", sorted(unknown), ", ".join(CHECKED))
    return set(CHECKED) if "all" in names else names


@cache
def checked(entry: str) -> bool:
    """Whether ``entry`` is to be used: not disabled, and the installed library is one it was checked against
    (warns once when it is not)."""
    if entry in disabled():
        log.info("chatforge.compat.%s is disabled by CHATFORGE_COMPAT_DISABLE", entry)
        return False
    distribution, versions = CHECKED[entry]
    found = installed(distribution)
    if found is not None and SpecifierSet(versions).contains(found, prereleases=True):
        return True
    log.warning(
        "chatforge.compat.%s was checked against %s%s, not %s %s: using %s's own behaviour (docs/compat.md)",
        entry,
        distribution,
        versions,
        distribution,
        found,
        distribution,
    )
    return False


def _missing(entry: str, what: str) -> None:
    log.warning("chatforge.compat.%s: %s; using the library's own behaviour (docs/compat.md)", entry, what)


# ---------------------------------------------------------------- Ray: a local Ray's internal knobs


def local_ray_env(cpus: int, idle_workers_per_cpu: int) -> dict[str, str]:
    """Ray's internal settings (``ray_config_def.h``, not a public API) for a Ray this process starts locally.

    - ``RAY_num_workers_soft_limit``: idle worker processes kept for the next task. Ray Data's keyed shuffles run
      in worker pools of their own; at the default (one per CPU) every switch between a map and a shuffle starts
      fresh Python workers, seconds each on a small machine. Curation wants 2 per CPU, training 0 (an idle worker
      only takes CPU from the training workers).
    - ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: how often Ray Train polls its workers' reports; the 2 s default
      throttles short runs.

    Empty outside the checked Ray versions, whose knobs may mean something else."""
    if not checked("local_ray_env"):
        return {}
    return {"RAY_num_workers_soft_limit": str(idle_workers_per_cpu * max(2, cpus)), **job_ray_env()}


def job_ray_env() -> dict[str, str]:
    """The part of `local_ray_env` a job's own processes read (Ray Train's controller), so a job's runtime_env can
    carry it to a cluster; ``RAY_num_workers_soft_limit`` is the raylet's, set where the nodes start."""
    if not checked("local_ray_env"):
        return {}
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


# ---------------------------------------------------------------- DeepSpeed: CPU training without a compiler


def skip_deepspeed_shm_op() -> bool:
    """Keep DeepSpeed on CPU from JIT-building its shared-memory collective op; returns whether it is skipped.

    ``deepspeed.comm.torch`` builds the op at ``init_distributed`` and fails hard when no C++ compiler is present
    (deepspeedai/DeepSpeed#7108 shows the build). Without it the collectives are plain gloo, with the same results.
    Called only when no compiler is on PATH."""
    entry = "skip_deepspeed_shm_op"
    if not checked(entry):
        return False
    import deepspeed.comm.torch  # noqa: F401  (the module whose attribute is replaced)

    module = sys.modules["deepspeed.comm.torch"]
    if not callable(getattr(module, "build_shm_op", None)):
        _missing(entry, "deepspeed.comm.torch has no build_shm_op")
        return False
    module.build_shm_op = lambda: None
    return True


# ---------------------------------------------------------------- Ray Data: block references


def block_refs(ds) -> list:
    """The object refs of a materialized dataset's blocks that hold rows.

    ``Dataset.iter_internal_ref_bundles`` is a DeveloperAPI; its bundles' ``blocks`` entries (``ref``, ``metadata``)
    are checked here. Empty blocks are left out because Ray 2.60's all-to-all operators can emit blocks with no
    columns, which break a later keyed shuffle's concatenation ("Schema at index 1 was different"). Where the shape
    differs, every block's ref (``Dataset.to_arrow_refs``), empty ones included."""
    entry = "block_refs"
    bundles = list(ds.iter_internal_ref_bundles()) if checked(entry) else None
    blocks = [block for bundle in bundles or () for block in getattr(bundle, "blocks", [None])]
    if bundles is None or not all(
        hasattr(b, "ref") and hasattr(getattr(b, "metadata", None), "num_rows") for b in blocks
    ):
        if bundles is not None:
            _missing(entry, "RefBundle.blocks entries have no ref/metadata.num_rows")
        return ds.to_arrow_refs()
    return [block.ref for block in blocks if block.metadata.num_rows != 0]


# ---------------------------------------------------------------- transformers: the KV cache's tensors


def cache_layers(cache) -> list:
    """The layers of a transformers ``DynamicCache``, each with ``keys`` and ``values`` tensors of shape
    (batch, heads, sequence, head_dim), which the serving engine concatenates and trims along batch and sequence.

    transformers exposes ``cache.layers`` but no API to concatenate two caches along the batch (continuous batching
    adds rows to a running batch), so the engine assigns the tensors. Raises a clear error when the layers are not
    as checked, at the first prefill of a replica rather than mid-request."""
    import torch

    layers = getattr(cache, "layers", None)
    if layers is None or not all(
        isinstance(getattr(layer, "keys", None), torch.Tensor)
        and isinstance(getattr(layer, "values", None), torch.Tensor)
        for layer in layers
    ):
        raise RuntimeError(
            f"transformers {installed('transformers')}'s DynamicCache has no layers with keys/values tensors, "
            f"which continuous batching needs (checked with transformers{CHECKED['cache_layers'][1]}): install a "
            "checked version"
        )
    return layers


# ---------------------------------------------------------------- Ray Serve


class _OverlappingBatchesAreMeant(logging.Filter):
    """Drops Serve's warning that ``max_batch_size * max_concurrent_batches > max_ongoing_requests``
    (ray-project/ray#43840).

    Serve assumes each batch call runs its own batch; chatforge's replicas feed every call into one shared engine
    batch, so the engine does reach ``max_batch_size`` (``max_ongoing_requests`` bounds it), and allowing as many
    overlapping calls as ongoing requests is what lets a newcomer join at the next token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def quiet_serve_batch_warning() -> None:
    """Filter the warning above out of ``ray.serve``'s logger (once), on checked Ray versions only."""
    logger = logging.getLogger("ray.serve")
    if checked("quiet_serve_batch_warning") and not any(
        isinstance(f, _OverlappingBatchesAreMeant) for f in logger.filters
    ):
        logger.addFilter(_OverlappingBatchesAreMeant())


HTTP_CONFIG_TIMEOUT_S = 10


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind, from the running Serve controller; None when it cannot be told.

    Ray Serve has no public Python API for its HTTP options: ``serve.status()`` leaves them out, and the REST API
    that has them (``GET /api/serve/applications/``) needs the dashboard. The bind address decides whether the API
    may run without keys, so None (internals changed, Serve not running) refuses anonymous access rather than
    assuming loopback."""
    import ray

    if not ray.is_initialized() or not checked("serve_http_host"):  # no Serve to ask (asking would start a Ray)
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
