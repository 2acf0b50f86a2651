"""chatforge.runtime: the Ray Data resource-limits fix (no Ray cluster needed: the resource manager is built alone)."""

from __future__ import annotations

import pytest
from ray.data._internal.execution.interfaces import ExecutionOptions, ExecutionResources
from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer
from ray.data._internal.execution.resource_manager import ResourceManager
from ray.data.context import DataContext

from chatforge.runtime import fix_ray_data_first_limits


class Cluster:
    """What the autoscaling coordinator's client reports: nothing on the first call (its answer is still in
    flight), the cluster's resources from then on."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> ExecutionResources:
        self.calls += 1
        if self.calls == 1:
            return ExecutionResources.zero()
        return ExecutionResources(cpu=2, gpu=0, object_store_memory=1 << 30)


def manager(cluster: Cluster) -> ResourceManager:
    context = DataContext.get_current()
    return ResourceManager({InputDataBuffer(context, [])}, ExecutionOptions(), cluster, context, None)


@pytest.fixture
def unpatched():
    """Ray Data's own get_global_limits for one test, the fix restored after it."""
    patched = ResourceManager.get_global_limits
    ResourceManager.get_global_limits = getattr(patched, "chatforge_original", patched)
    yield
    ResourceManager.get_global_limits = patched


def test_ray_data_keeps_the_empty_first_answer_for_a_second(unpatched):
    """The bug the fix is for, shown on Ray Data as installed: two CPUs are known, yet the limits stay at zero."""
    cluster = Cluster()
    rm = manager(cluster)
    assert rm.get_global_limits().cpu == 0
    assert rm.get_global_limits().cpu == 0 and cluster.calls == 1  # cached: not asked again within the second


def test_with_the_fix_the_next_scheduling_step_sees_the_cluster():
    assert fix_ray_data_first_limits()
    assert fix_ray_data_first_limits()  # idempotent: not wrapped twice
    cluster = Cluster()
    rm = manager(cluster)
    assert rm.get_global_limits().cpu == 0
    assert rm.get_global_limits().cpu == 2 and cluster.calls == 2
    assert rm.get_global_limits().cpu == 2 and cluster.calls == 2  # a real answer is cached as before


def test_with_the_fix_a_connected_driver_schedules_on_the_whole_cluster_until_the_coordinator_answers(monkeypatch):
    """In a job's first execution the coordinator's actor is still starting; the limits come from the cluster."""
    import ray

    assert fix_ray_data_first_limits()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0, "object_store_memory": 4e9})
    cluster = Cluster()
    rm = manager(cluster)
    first = rm.get_global_limits()
    assert (first.cpu, first.gpu) == (8, 1) and 0 < first.object_store_memory <= 4e9
    assert rm.get_global_limits().cpu == 2 and cluster.calls == 2  # the coordinator's answer wins once it comes
