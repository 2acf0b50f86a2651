"""Split: train/val/test by a salted hash of the id, so a record lands in the same split on every run.

Slices made by augment hash their parent's id and so share its split.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import pyarrow as pa

from chatforge.config import SplitSpec
from chatforge.data.batches import RecordBatchFn, RecordStep
from chatforge.data.schema import Record, is_kept

SPLIT_COLUMNS = {"split": pa.string()}


def assign_split(record_id: str, spec: SplitSpec) -> str:
    digest = hashlib.blake2b(f"{spec.salt}\x00{record_id}".encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    if position < spec.train:
        return "train"
    if position < spec.train + spec.val:
        return "val"
    return "test"


def split_records(records: list[Record], spec: SplitSpec) -> list[Record]:
    for record in records:
        record["split"] = assign_split(record.get("parent_id") or record["id"], spec) if is_kept(record) else None
    return records


@dataclass(frozen=True)
class SplitStep(RecordStep):
    spec: SplitSpec

    def record_fn(self) -> RecordBatchFn:
        return RecordBatchFn(functools.partial(split_records, spec=self.spec), stage="split", adds=SPLIT_COLUMNS)
