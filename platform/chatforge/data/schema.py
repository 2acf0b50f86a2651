"""The conversation record: its Arrow schema, and the glue between Ray Data blocks and pure per-batch functions.

One conversation per row. Base columns (every stage keeps them):
  id           stable: "<source>:<source id>", else "<source>:<content hash>"
  source       the name of the source in the spec
  messages     list<struct<role, content>>, roles system|user|assistant
  meta         JSON string (origin "file#byte", source-specific fields; ``original_messages`` of a record whose
               turns the filters repaired)
  raw          the raw text of a record that could not be read (null otherwise)
  drop_reason  null while the row is kept; the first reason a step rejects it ("mark, don't filter")

Steps add typed columns (declared as ``adds`` to `RecordBatchFn`). Every per-batch function takes and returns a
list of row dicts, so it is unit-testable without Ray.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

BASE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("meta", pa.string()),
        ("raw", pa.string()),
        ("drop_reason", pa.string()),
    ]
)

# Per-stage UDF time (seconds, summed over batches) rides along in this column so the manifest can report
# where time went without relying on Ray's private stats API; it is dropped before the final write.
STAGE_SECONDS_COLUMN = "_stage_seconds"
STAGE_SECONDS_TYPE = pa.map_(pa.string(), pa.float64())

Record = dict[str, Any]
BatchFn = Callable[[list[Record]], list[Record]]

ORIGINAL_MESSAGES = "original_messages"  # meta key: a repaired conversation as filters received it


def is_kept(record: Record) -> bool:
    """True while no step has rejected the record."""
    return record.get("drop_reason") is None


def mark_dropped(record: Record, reason: str) -> Record:
    """Set ``drop_reason`` unless an earlier step already did (first reason wins)."""
    if record.get("drop_reason") is None:
        record["drop_reason"] = reason
    return record


def content_hash(messages: list[dict[str, str]]) -> str:
    """A stable hash of a conversation's roles and contents."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=10).hexdigest()


def make_id(source: str, source_id: str | None, messages: list[dict[str, str]] | None, raw: str = "") -> str:
    """Stable id: source + source id when the source has one, else a hash of the content (or raw text)."""
    if source_id not in (None, ""):
        return f"{source}:{source_id}"
    if messages:
        return f"{source}:{content_hash(messages)}"
    return f"{source}:raw-{hashlib.blake2b(raw.encode('utf-8', 'replace'), digest_size=10).hexdigest()}"


def conversation_text(messages: list[dict[str, str]]) -> str:
    """All turns as one string, for scorers and length checks."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def with_columns(schema: pa.Schema, adds: dict[str, pa.DataType]) -> pa.Schema:
    """``schema`` plus the columns in ``adds`` (existing ones keep their position, take the new type)."""
    for name, dtype in adds.items():
        index = schema.get_field_index(name)
        field = pa.field(name, dtype)
        schema = schema.set(index, field) if index >= 0 else schema.append(field)
    return schema


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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_heap() -> None:
    """Hand the pages a batch's row dicts freed back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A batch as row dicts is many small and mid-sized objects; freed, they leave glibc's heaps fragmented, and it
    keeps those pages: after the 4x curation benchmark each idle worker still held ~250 MB of heap from the
    staging pass, and idle workers were the largest part of the run's peak memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
