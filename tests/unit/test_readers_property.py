"""Property tests of the readers: whatever bytes a JSONL or JSON file holds, reading and parsing it yields exactly one
row per line or top-level element, malformed or not, and never raises (so no record can stop a run)."""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.config import ReadSpec
from chatforge.data.batches import records_to_table
from chatforge.data.formats import parse_raw_records
from chatforge.data.sources import BOM, RECORD_SCHEMA, iter_json_elements, iter_jsonl_range

READ = ReadSpec(max_record_bytes=1024, raw_keep_bytes=256)
JSON_SPACE = b" \t\r\n"
STRUCTURE = b'[]{},"'

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# JSON texts of roles and contents, escapes included: "\\ud800" alone is not a character, "\\ud83d\\ude00" is one.
VALID = ['"user"', '"assistant"'] * 4 + ['"system"', '"human"', '"gpt"']
roles = st.sampled_from([*VALID, '"robot"', '""', '"\\ud800"', "5"])
contents = st.text(max_size=30).map(json.dumps) | st.sampled_from(
    ['"a \\ud800 b"', '"\\udfff"', '"\\ud83d\\ude00"', '"x\\u0000y"', '["part"]', '[{"type": "text", "text": "t"}]']
)
extras = ["", "", ', "id": "7"', ', "id": 7', ', "id": "\\ud800"', ', "\\udc00": 1', ', "m": ' + "[" * 70 + "]" * 70]


@st.composite
def records(draw) -> bytes:
    """Conversation records, mostly well-formed, with escapes and nesting the parser must refuse or keep."""
    turns = draw(st.lists(st.tuples(roles, contents), min_size=1, max_size=4))
    messages = ", ".join(f'{{"role": {role}, "content": {content}}}' for role, content in turns)
    key = draw(st.sampled_from(["messages"] * 4 + ["conversations", "turns"]))
    return f'{{"{key}": [{messages}]{draw(st.sampled_from(extras))}}}'.encode()


junk = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in STRUCTURE))
# One element each: records (the most), JSON values, structure-free junk (invalid UTF-8 and bare words included), junk inside
# braces or a string, deep nesting, and elements over the size limit.
elements = st.one_of(
    records(),
    records(),
    records(),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    records(),
    junk,
    junk.map(lambda b: b"{" + b + b"}"),
    junk.map(lambda b: b'"' + b.replace(b"\\", b"") + b'"'),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1000, 1100).map(lambda n: b'"' + b"x" * n + b'"'),
)


def read_and_parse(rows: list[tuple[str, str | None]], fmt: str) -> list[dict]:
    raw = [{"source": "s", "format": fmt, "origin": f"f#{i}", "raw": t, "error": e} for i, (t, e) in enumerate(rows)]
    records = parse_raw_records(raw, {}, READ.raw_keep_bytes)
    table = records_to_table(records, RECORD_SCHEMA)  # where a record Arrow cannot hold would fail the batch
    assert table.num_rows == len(raw)
    assert all(r["drop_reason"] is None or r["drop_reason"].startswith("malformed:") for r in records)
    return records


def nonblank(element: bytes) -> bool:
    return bool(element.strip(JSON_SPACE))


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(elements, max_size=12),
    bom=st.booleans(),
    fmt=st.sampled_from(["openai", "sharegpt", "chitchat"]),
    chunk_bytes=st.sampled_from([1, 3, 64, 1 << 20]),
)
def test_a_json_array_yields_one_row_per_element(items, bom, fmt, chunk_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.json")
        with open(path, "wb") as f:
            f.write((BOM if bom else b"") + b"[" + b" ,\n".join(items) + b"]\n")
        rows = [(text, error) for _, text, error in iter_json_elements(path, READ, chunk_bytes=chunk_bytes)]
    assert len(rows) == sum(map(nonblank, items))
    read_and_parse(rows, fmt)


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(elements | st.binary(max_size=60), max_size=12).map(
        lambda ls: [line.replace(b"\n", b" ") for line in ls]
    ),
    bom=st.booleans(),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    fmt=st.sampled_from(["openai", "sharegpt"]),
    cuts=st.lists(st.integers(0, 4000), max_size=4),
)
def test_a_jsonl_file_yields_one_row_per_line_however_it_is_cut_into_ranges(lines, bom, newline, fmt, cuts):
    data = (BOM if bom else b"") + newline.join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
        rows = [
            (text, error)
            for start, end in zip(bounds, bounds[1:])
            for _, text, error in iter_jsonl_range(path, start, end, READ)
        ]
    expected = data.split(newline) if lines else []
    expected[:1] = [line.removeprefix(BOM) for line in expected[:1]]  # the reader drops one mark at the start
    assert len(rows) == sum(bool(line.strip()) for line in expected)
    read_and_parse(rows, fmt)


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=300), fmt=st.sampled_from(["openai", "chitchat"]), chunk_bytes=st.sampled_from([1, 7, 4096])
)
def test_any_bytes_as_a_json_document_never_raise(data, fmt, chunk_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.json")
        with open(path, "wb") as f:
            f.write(b"[" + data)
        rows = [(text, error) for _, text, error in iter_json_elements(path, READ, chunk_bytes=chunk_bytes)]
    read_and_parse(rows, fmt)
