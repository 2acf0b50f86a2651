"""Canaries of chatforge.compat: each fails when the library it reaches into changes shape. `serve_http_host` and
`block_refs` need a running Ray: tests/integration/test_serve_app.py and test_pipeline_ray.py check them."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from chatforge import compat


@pytest.mark.parametrize("entry", sorted(compat.CHECKED))
def test_every_entry_was_checked_against_the_installed_library(entry):
    """Fails on an upgrade past an entry's checked versions: re-check the entry, then widen its range."""
    assert compat.checked(entry), compat.CHECKED[entry]


def test_deepspeed_builds_its_shm_op_where_the_patch_expects_it(monkeypatch):
    import deepspeed.comm.torch  # noqa: F401

    module = sys.modules["deepspeed.comm.torch"]
    assert callable(module.build_shm_op)
    monkeypatch.setattr(module, "build_shm_op", module.build_shm_op)  # restored after the test
    assert compat.skip_deepspeed_shm_op()
    assert module.build_shm_op() is None


def test_dynamic_cache_layers_hold_keys_and_values_tensors():
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
    cache = DynamicCache(config=config)
    for layer in range(2):
        cache.update(torch.zeros(3, 2, 5, 8), torch.ones(3, 2, 5, 8), layer)
    layers = compat.cache_layers(cache)
    assert len(layers) == 2 and layers[0].keys.shape == (3, 2, 5, 8) and bool(layers[1].values.all())
    layers[0].keys = layers[0].keys[:, :, 1:]  # the engine trims and concatenates by assignment
    assert cache.layers[0].keys.shape == (3, 2, 4, 8)


def test_a_cache_of_another_shape_is_a_clear_error():
    with pytest.raises(RuntimeError, match="DynamicCache has no layers with keys/values tensors"):
        compat.cache_layers(object())


def test_the_serve_batch_warning_is_filtered_once_and_only_it(caplog):
    logger = logging.getLogger("ray.serve")
    compat.quiet_serve_batch_warning()
    compat.quiet_serve_batch_warning()
    assert sum(isinstance(f, compat._OverlappingBatchesAreMeant) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        logger.warning("max_batch_size * max_concurrent_batches (4096) > max_ongoing_requests (64)")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == "ray.serve"] == ["something else"]


def test_ray_serve_still_warns_about_overlapping_batches():
    """What the filter drops must still be what Serve says: its warning names max_concurrent_batches."""
    import inspect

    from ray.serve import batching

    assert "max_concurrent_batches" in inspect.getsource(batching)


def test_ray_still_reads_the_knobs_local_ray_env_sets():
    from ray.train.v2._internal import constants

    env = compat.local_ray_env(cpus=2, idle_workers_per_cpu=2)
    assert env["RAY_num_workers_soft_limit"] == "4"  # read by the raylet; tests/integration/test_runtime_ray.py
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR in env


def test_outside_the_checked_versions_an_entry_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(compat.CHECKED, "local_ray_env", ("ray", "<1"))
    compat.checked.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="chatforge.compat"):
            assert compat.local_ray_env(cpus=2, idle_workers_per_cpu=2) == {}
        assert "checked against ray<1" in caplog.text
    finally:
        compat.checked.cache_clear()


def test_parquet_reads_back_a_fixed_size_list_column_with_nulls(tmp_path):
    """Dedup stages MinHash signatures so (null for dropped rows); pyarrow 25 fails to read them back, hence
    pyproject's pyarrow>=26 and mlflow-skinny (mlflow itself pins pyarrow<26)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(np.arange(12, dtype=np.uint32))
    column = pa.FixedSizeListArray.from_arrays(values, 4, mask=pa.array([False, True, False]))
    pq.write_table(pa.table({"signature": column}), tmp_path / "staged.parquet")
    back = pq.read_table(tmp_path / "staged.parquet")["signature"]
    assert back.null_count == 1 and back.to_pylist()[2] == [8, 9, 10, 11]
