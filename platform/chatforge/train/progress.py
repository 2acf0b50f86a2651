"""Training progress in the driver: rank 0's reports, relayed from Ray Train's controller while ``fit()`` runs.

Ray Train calls a `UserCallback` in its controller actor after every report; `ReportRelay` puts rank 0's metrics
on a `ray.util.queue.Queue`, and `follow_reports` reads them in a driver thread and hands each to a function (the
CLI's progress bar). ``fit()`` itself stays in the driver's main thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ray.train import UserCallback

Report = dict[str, Any]


class ReportRelay(UserCallback):
    """Runs in the Train controller: forwards rank 0's metrics of every report to the driver's queue."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics: list[Report], checkpoint) -> None:
        if metrics:
            with contextlib.suppress(Exception):  # a full or gone queue must never fail the run
                self.queue.put_nowait(dict(metrics[0]))


@contextlib.contextmanager
def follow_reports(on_report: Callable[[Report], None] | None) -> Iterator[list[UserCallback]]:
    """The callbacks to give the trainer's RunConfig; while inside, ``on_report`` sees each report in the driver."""
    if on_report is None:
        yield []
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                report = queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down): nothing more will come
                return
            with contextlib.suppress(Exception):  # a display error must not stop the relay
                on_report(report)

    thread = threading.Thread(target=drain, name="chatforge-train-progress", daemon=True)
    thread.start()
    try:
        yield [ReportRelay(queue)]
    finally:
        stop.set()
        thread.join(timeout=2)
        with contextlib.suppress(Exception):
            queue.shutdown()
