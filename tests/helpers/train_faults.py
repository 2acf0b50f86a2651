"""Fault injection for resume tests: a training step callback that kills a Ray Train worker process mid-run."""

from __future__ import annotations

import os
import sys
import time

import ray.cloudpickle


class KillWorkerAt:
    """Kills the last rank's worker process right after optimizer step ``step``, on the run's first attempt only: the
    one whose first step was step 1 (an attempt resumed from a checkpoint starts past it).

    The pause first lets Ray collect the last checkpoint report, which a worker that dies at once can lose: a test of
    resume must not depend on that race.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.first_step: int | None = None

    def after_step(self, state, checkpoint: bool) -> None:
        import ray.train

        if self.first_step is None:
            self.first_step = state.step
        context = ray.train.get_context()
        last_rank = context.get_world_rank() == context.get_world_size() - 1
        if state.step == self.step and self.first_step == 1 and last_rank:
            time.sleep(2.0)
            os._exit(1)


class StallForNodeLoss:
    """Once (until ``marker`` exists), right after optimizer step ``step``, the last rank writes its node's id to
    ``marker`` and stalls, so that a test can remove that node from the cluster while the run is mid-way (the other
    rank waits in the next collective). Step callbacks run before the step's report: stall a step after a checkpoint
    step, so that its checkpoint is in."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def after_step(self, state, checkpoint: bool) -> None:
        import ray
        import ray.train

        context = ray.train.get_context()
        last_rank = context.get_world_rank() == context.get_world_size() - 1
        if state.step == self.step and last_rank and not os.path.exists(self.marker):
            time.sleep(2.0)  # Ray collects the last checkpoint's report first
            with open(self.marker + ".tmp", "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            os.replace(self.marker + ".tmp", self.marker)
            time.sleep(600)  # until the node goes


# Ray's workers cannot import the tests' helpers, so a callback travels with its class.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
