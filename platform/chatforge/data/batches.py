"""Pure per-batch functions as Ray Data UDFs: a function of row dicts mapped over pyarrow blocks, and a run of
record steps composed into one map.

Every step's per-record logic is a ``list[Record] -> list[Record]`` function (`BatchFn`), unit-testable without
Ray. `RecordBatchFn` turns one into a pyarrow-batch UDF for ``map_batches`` and charges its time to its stage in
the `STAGE_SECONDS_COLUMN`; `RecordStep` is a step that is one such function, and `apply_steps` runs a pipeline's
steps with each run of consecutive record steps composed into one map.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from chatforge.data.schema import STAGE_SECONDS_COLUMN, STAGE_SECONDS_TYPE, Record, with_columns
from chatforge.runtime import release_freed_heap

BatchFn = Callable[[list[Record]], list[Record]]


def table_to_records(table: pa.Table) -> list[Record]:
    return table.to_pylist()


def records_to_table(records: list[Record], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(records, schema=schema)


def add_stage_seconds(records: list[Record], stage: str, seconds: float) -> None:
    """Charge a batch's time to its first row, so a sum over all rows gives the stage total."""
    if not records:
        return
    first = records[0]
    timings = dict(first.get(STAGE_SECONDS_COLUMN) or [])
    timings[stage] = timings.get(stage, 0.0) + seconds
    first[STAGE_SECONDS_COLUMN] = list(timings.items())


class RecordBatchFn:
    """Wraps a pure ``list[Record] -> list[Record]`` function as a pyarrow-batch UDF for ``map_batches``.

    The output schema is ``schema`` if given, else the input's plus ``adds``; the batch's run time is charged to
    ``stage``. ``a.then(b)`` is one UDF running both: the batch becomes row dicts and an Arrow table again once,
    not once per step (nested ``messages`` make that round trip cost as much as a light step; Ray Data fuses
    consecutive maps into one task but still converts between them).
    """

    def __init__(
        self,
        fn: BatchFn,
        stage: str,
        adds: dict[str, pa.DataType] | None = None,
        schema: pa.Schema | None = None,
        to_records: Callable[[pa.Table], list[Record]] = table_to_records,
    ):
        self.parts: tuple[tuple[BatchFn, str], ...] = ((fn, stage),)
        self.adds = {**(adds or {}), STAGE_SECONDS_COLUMN: STAGE_SECONDS_TYPE}
        self.schema = schema
        self.to_records = to_records  # a reader's own, for input that may not convert (see formats.parquet_rows)

    def then(self, other: RecordBatchFn) -> RecordBatchFn:
        composed = copy.copy(self)
        composed.parts = self.parts + other.parts
        if other.schema is not None:
            composed.schema = other.schema
        elif self.schema is not None:
            composed.schema = with_columns(self.schema, other.adds)
        else:
            composed.adds = {**self.adds, **other.adds}
        return composed

    @property
    def stages(self) -> list[str]:
        return [stage for _, stage in self.parts]

    def __call__(self, table: pa.Table) -> pa.Table:
        records = self.to_records(table)
        for fn, stage in self.parts:
            started = time.perf_counter()
            records = fn(records)
            add_stage_seconds(records, stage, time.perf_counter() - started)
        out = records_to_table(records, self.schema or with_columns(table.schema, self.adds))
        del records
        release_freed_heap()
        return out


class RecordStep:
    """A curation step that is one `RecordBatchFn` (``record_fn``); `apply_steps` runs a run of them as one UDF."""

    def record_fn(self) -> RecordBatchFn:
        raise NotImplementedError

    def __call__(self, ds):
        return ds.map_batches(self.record_fn(), batch_format="pyarrow")


def apply_steps(ds, steps: list) -> Any:
    """``ds`` through ``steps`` in order, consecutive `RecordStep`s composed into one map (see `RecordBatchFn`)."""
    pending: RecordBatchFn | None = None
    for step in steps:
        if isinstance(step, RecordStep):
            pending = step.record_fn() if pending is None else pending.then(step.record_fn())
            continue
        if pending is not None:
            ds, pending = ds.map_batches(pending, batch_format="pyarrow"), None
        ds = step(ds)
    return ds if pending is None else ds.map_batches(pending, batch_format="pyarrow")


def map_records(
    ds,
    fn: BatchFn,
    stage: str,
    adds: dict[str, pa.DataType] | None = None,
    schema: pa.Schema | None = None,
    **map_kwargs,
):
    """Apply a pure per-batch record function to a Ray Dataset (stateless tasks)."""
    return ds.map_batches(RecordBatchFn(fn, stage, adds, schema), batch_format="pyarrow", **map_kwargs)


def pool_actor_cpus(wanted: float, actors: int, total: float) -> float:
    """CPUs each actor of a pool (toxicity scorers, condition's generators) reserves, leaving two CPUs of the cluster
    to the tasks around the pool.

    A pool's actors hold their CPUs for the whole run: if they took every CPU, the reads, shuffles and maps upstream
    could never be scheduled and the pipeline would wait forever (seen on a 1-CPU Ray). With one CPU left, the map
    feeding the pool and the one draining it take turns on it; with two, both run. Reserving less only changes
    scheduling; the actors still use the cores the OS gives them (their torch threads follow ``wanted``).
    ``total``: the cluster's CPUs.
    """
    room = max(total - 2.0, 0.0) / actors
    return min(wanted, room)
