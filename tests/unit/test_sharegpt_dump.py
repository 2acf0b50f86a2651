"""A ShareGPT-shaped dump through the read, normalize and filters code of a curation run, on Arrow blocks without Ray:
the split conversations' later parts and the turn runs are repaired and kept, the broken records dropped with their
reasons."""

import functools
import json
import re
from collections import Counter

import pytest

from chatforge.config import FiltersSpec, NormalizeSpec, ReadSpec, SourceSpec
from chatforge.data.batches import RecordBatchFn
from chatforge.data.filters import FiltersStep
from chatforge.data.formats import parse_raw_records
from chatforge.data.normalize import NormalizeStep
from chatforge.data.pipeline import block_stats, merge_stats
from chatforge.data.sources import RECORD_SCHEMA, ConversationFiles
from helpers.sharegpt_dump import sharegpt_dump, write_sharegpt_dump

_SOURCE_ID = re.compile(r'"id": "([^"]+)"')


def curate_rows(path, filters: FiltersSpec) -> list[dict]:
    """Every record of ``path`` after read, normalize and filters, as a curation run's read tasks produce them."""
    read = ReadSpec(block_rows=500)
    parse = functools.partial(parse_raw_records, role_map={}, raw_keep_bytes=read.raw_keep_bytes)
    udf = (
        RecordBatchFn(parse, stage="read", schema=RECORD_SCHEMA)
        .then(NormalizeStep(NormalizeSpec()).record_fn())
        .then(FiltersStep(filters).record_fn())
    )
    files = ConversationFiles(SourceSpec(name="dump", format="sharegpt", path=str(path)), read)
    return [row for task, _ in files.tasks() for block in task() for row in udf(block).to_pylist()]


def source_id(row: dict) -> str:
    if row["messages"] is not None:
        return row["id"].removeprefix("dump:")
    return _SOURCE_ID.search(row["raw"]).group(1)  # a malformed row's id hashes its text; its raw text names it


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_a_realistic_sharegpt_dump_keeps_the_repairable_records(tmp_path, fmt):
    records = sharegpt_dump(1500, seed=11)
    path = tmp_path / f"dump.{fmt}"
    write_sharegpt_dump(path, records, fmt)
    rows = curate_rows(path, FiltersSpec())

    by_id = {source_id(row): row for row in rows}
    assert len(rows) == len(by_id) == len(records)
    for expected in records:
        row = by_id[expected.id]
        assert row["drop_reason"] == expected.expected, expected.text[:300]
        if expected.expected is None:
            assert row["repairs"] == list(expected.repairs)
            original = json.loads(row["meta"]).get("original_messages")
            assert original == (list(expected.messages) if expected.repairs else None)

    stats = merge_stats([block_stats(rows)])
    complete = [r for r in records if r.expected is None]
    leading = sum("leading_assistant" in r.repairs for r in complete)
    assert stats["input_records"] == len(records) and stats["kept"] == len(complete)
    assert stats["repaired"] == {
        "leading_assistant": leading,
        "merged_turns": sum("merged_turns" in r.repairs for r in complete),
    }
    assert stats["dropped"] == Counter(r.expected for r in records if r.expected is not None)
    # The dump is like the real ones: a third of its records open with an answer, a few are broken, and the
    # broken ones are every kind of bad input.
    assert 0.25 < leading / len(records) < 0.45
    assert {
        "malformed:empty_conversation",
        "malformed:unknown_role",
        "malformed:invalid_json",
        "empty_turn",
        "too_few_turns",
        "no_assistant_turn",
    } <= set(stats["dropped"])
    assert stats["kept"] >= 0.85 * stats["input_records"]


def test_without_repairs_the_same_dump_loses_a_third_to_role_order(tmp_path):
    records = sharegpt_dump(600, seed=11)
    path = tmp_path / "dump.json"
    write_sharegpt_dump(path, records)
    stats = block_stats(curate_rows(path, FiltersSpec(leading_assistant="drop", consecutive_turns="drop")))
    assert stats["dropped"]["role_order"] > 0.3 * stats["input_records"]
    assert stats["kept"] < 0.7 * stats["input_records"]
    assert stats["repaired"] == {}
