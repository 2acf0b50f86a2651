"""The conversation record: its Arrow schema, its id, and how a step marks it dropped.

One conversation per row. Base columns (every stage keeps them):
  id           stable: "<source>:<source id>", else "<source>:<content hash>"
  source       the name of the source in the spec
  messages     list<struct<role, content>>, roles system|user|assistant
  meta         JSON string (origin "file#byte", source-specific fields; ``original_messages`` of a record whose
               turns the filters repaired)
  raw          the raw text of a record that could not be read (null otherwise)
  drop_reason  null while the row is kept; the first reason a step rejects it ("mark, don't filter")

Steps add typed columns (declared as ``adds`` to `chatforge.data.batches.RecordBatchFn`, which runs the steps'
per-batch functions on row dicts).
"""

from __future__ import annotations

import hashlib
import json
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


def with_columns(schema: pa.Schema, adds: dict[str, pa.DataType]) -> pa.Schema:
    """``schema`` plus the columns in ``adds`` (existing ones keep their position, take the new type)."""
    for name, dtype in adds.items():
        index = schema.get_field_index(name)
        field = pa.field(name, dtype)
        schema = schema.set(index, field) if index >= 0 else schema.append(field)
    return schema
