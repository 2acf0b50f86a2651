import functools
import gzip
import json
import os
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import ReadSpec, SourceSpec
from chatforge.data.batches import RecordBatchFn, records_to_table
from chatforge.data.formats import check_parquet_records, parquet_rows, parse_raw_records
from chatforge.data.sources import (
    BOM,
    MIN_RANGE_BYTES,
    RECORD_SCHEMA,
    ConversationFiles,
    ReadCounts,
    SourceError,
    chitchat_corpus_path,
    iter_json_elements,
    iter_jsonl_range,
    iter_jsonl_stream,
    scan_source,
)


def raw_rows(fmt, items):
    return [
        {"source": "s", "format": fmt, "origin": f"f#{i}", "raw": raw, "error": err}
        for i, (raw, err) in enumerate(items)
    ]


def sharegpt(i, human="hello", gpt="hi there"):
    return {"id": str(i), "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_json_array_elements_stream_with_tricky_strings(tmp_path):
    records = [sharegpt(i, human='brackets ] } [ { and "quotes", commas, \\ backslash \u00e9') for i in range(20)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=2))
    # tiny chunks cut strings, escapes and multi-byte characters at every place
    for chunk_bytes in (1, 2, 5):
        elements = list(iter_json_elements(str(path), ReadSpec(), chunk_bytes=chunk_bytes))
        assert [json.loads(raw) for _, raw, err in elements] == records
    assert all(err is None for _, _, err in elements)
    assert [n for n, _, _ in elements] == list(range(1, 21))


def test_json_array_cut_off_keeps_complete_records(tmp_path):
    text = json.dumps([sharegpt(i) for i in range(3)])
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"from"') + 5])
    elements = list(iter_json_elements(str(path), ReadSpec()))
    assert [err for _, _, err in elements] == [None, None, "truncated"]
    assert json.loads(elements[1][1]) == sharegpt(1)
    assert elements[2][1].startswith('{"id": "2"')


def test_json_array_oversize_record_is_reported_and_skipped(tmp_path):
    records = [sharegpt(0), sharegpt(1, gpt="x" * 5000), sharegpt(2)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records))
    read = ReadSpec(max_record_bytes=2048, raw_keep_bytes=256)
    elements = list(iter_json_elements(str(path), read, chunk_bytes=512))
    assert [err for _, _, err in elements] == [None, "record_too_large", None]
    assert len(elements[1][1]) == 256
    assert json.loads(elements[2][1]) == sharegpt(2)


def test_jsonl_ranges_cover_every_line_once(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}" * (i % 7)}]}) for i in range(200)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    size = path.stat().st_size
    seen = []
    for start in range(0, size, 97):
        seen += [text for _, text, _ in iter_jsonl_range(str(path), start, min(start + 97, size), ReadSpec())]
    assert seen == lines


@pytest.mark.parametrize(
    ("total", "cpus", "ranges"),
    [
        (1000, 2, 1),  # too small to be worth two tasks
        (4 * MIN_RANGE_BYTES, 1, 2),  # two per CPU
        (4 * MIN_RANGE_BYTES, 2, 4),
        (3 * MIN_RANGE_BYTES, 64, 3),  # never below MIN_RANGE_BYTES, however many CPUs
        (10 * (64 << 20), 2, 10),  # never above read.range_bytes
    ],
)
def test_jsonl_ranges_are_equal_two_per_cpu_within_bounds(total, cpus, ranges):
    files = ConversationFiles(SourceSpec(name="s", format="openai", path="x"), ReadSpec(), cpus=cpus)
    size = files.range_bytes(total)
    assert -(-total // size) == ranges
    assert size * ranges - total < ranges  # equal, up to rounding
    assert size <= ReadSpec().range_bytes


def test_jsonl_files_become_equal_range_tasks_and_one_block_each(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "x" * 50}]}) for _ in range(4000)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    files = ConversationFiles(
        SourceSpec(name="s", format="openai", path=str(path)), ReadSpec(range_bytes=size // 3 + 1), cpus=2
    )
    tasks = files.tasks()
    assert len(tasks) == 3 and sum(n for _, n in tasks) == size
    assert max(n for _, n in tasks) - min(n for _, n in tasks) <= 2
    assert sum(block.num_rows for fn, _ in tasks for block in fn()) == len(lines)
    # As many blocks as tasks, so Ray Data fuses the steps into the read tasks; more when CPUs would sit idle.
    assert files.num_blocks(len(tasks)) == 3
    assert ConversationFiles(files.source, files.read, cpus=8).num_blocks(3) == 6


def test_jsonl_oversize_and_bad_utf8_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"b": "' + b"x" * 5000 + b'"}\n' + b'{"c": "\xff"}\n{"d": 2}\n')
    rows = list(
        iter_jsonl_range(str(path), 0, path.stat().st_size, ReadSpec(max_record_bytes=1024, raw_keep_bytes=256))
    )
    assert [err for _, _, err in rows] == [None, "record_too_large", "invalid_utf8", None]
    assert rows[3][1] == '{"d": 2}'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"id": 1, "conversations": [{"from": "human", "value": "hi"}', "invalid_json"),
        ('"just a string"', "not_an_object"),
        ('{"id": 1}', "missing_messages"),
        ('{"conversations": []}', "empty_conversation"),
        ('{"conversations": [{"from": "alien", "value": "hi"}]}', "unknown_role"),
        ('{"conversations": [{"from": "human", "value": 42}]}', "non_string_content"),
        ('{"conversations": [{"from": "human"}]}', "bad_turn"),
        ('{"conversations": ["hi"]}', "bad_turn"),
    ],
)
def test_sharegpt_bad_records_become_malformed_rows(raw, reason):
    (record,) = parse_raw_records(raw_rows("sharegpt", [(raw, None)]), {}, 1000)
    assert record["drop_reason"] == f"malformed:{reason}"
    assert record["raw"] == raw
    assert json.loads(record["meta"])["origin"] == "f#0"


def test_sharegpt_roles_mapped_and_ids_stable():
    raw = json.dumps(sharegpt(7))
    first = parse_raw_records(raw_rows("sharegpt", [(raw, None)]), {}, 1000)[0]
    assert first["id"] == "s:7"
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    no_id = json.dumps({"conversations": sharegpt(0)["conversations"]})
    a = parse_raw_records(raw_rows("sharegpt", [(no_id, None)]), {}, 1000)[0]["id"]
    b = parse_raw_records(raw_rows("sharegpt", [(no_id, None)]), {}, 1000)[0]["id"]
    assert a == b and a.startswith("s:")


def test_openai_content_parts_and_extra_role_map():
    raw = json.dumps(
        {
            "messages": [
                {"role": "customer", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
                {"role": "assistant", "content": "hi"},
            ]
        }
    )
    (record,) = parse_raw_records(raw_rows("openai", [(raw, None)]), {"Customer": "user"}, 1000)
    assert record["drop_reason"] is None
    assert record["messages"][0] == {"role": "user", "content": "hello"}


def test_reader_errors_are_kept_with_raw_text():
    (record,) = parse_raw_records(raw_rows("openai", [('{"messages": [', "truncated")]), {}, 1000)
    assert record["drop_reason"] == "malformed:truncated"
    assert record["raw"] == '{"messages": ['


def test_chitchat_corpus_members_parse():
    elements = []
    for item in iter_json_elements(chitchat_corpus_path(), ReadSpec()):
        elements.append(item)
        if len(elements) == 3:
            break
    records = parse_raw_records(raw_rows("chitchat", [(raw, err) for _, raw, err in elements]), {}, 1000)
    for record in records:
        assert record["drop_reason"] is None
        assert record["messages"][0]["role"] == "user"
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert "prompt" in json.loads(record["meta"]) or "start" in json.loads(record["meta"])


# ---------------------------------------------------------------- the JSON-array reader: linear, bounded, total


def test_json_array_reader_time_is_linear_in_a_long_string(tmp_path):
    def seconds(mib: int) -> float:
        path = tmp_path / f"{mib}.json"
        path.write_text(json.dumps([sharegpt(0, gpt="x" * (mib << 20)), sharegpt(1)]))
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            assert [err for _, _, err in iter_json_elements(str(path), ReadSpec())] == [None, None]
            best = min(best, time.perf_counter() - started)
        return best

    # 8x the string, ~8x the time (a reader that rescans the string per chunk takes ~40x)
    assert seconds(8) < 16 * seconds(1) + 0.05


def test_json_array_reader_memory_is_one_chunk_past_the_record_limit(tmp_path):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([sharegpt(0), sharegpt(1, gpt="x" * (4 << 20)), sharegpt(2)]))
    read = ReadSpec(max_record_bytes=64 << 10, raw_keep_bytes=256)
    tracemalloc.start()
    try:
        elements = list(iter_json_elements(str(path), read, chunk_bytes=256 << 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [err for _, _, err in elements] == [None, "record_too_large", None]
    assert elements[1][1].startswith('{"id": "1"') and len(elements[1][1]) == 256
    assert peak < 4 * (256 << 10) + 2 * read.max_record_bytes  # the string is 4 MiB


def test_json_reader_keeps_what_follows_the_array_and_bad_bytes_apart(tmp_path):
    path = tmp_path / "odd.json"
    path.write_bytes(b'\xef\xbb\xbf [{"a": 1}, "\xff\xfe", {"b": "]"}] [3] {"c": 4}, tail')
    elements = list(iter_json_elements(str(path), ReadSpec()))
    assert [(raw, err) for _, raw, err in elements] == [
        ('{"a": 1}', None),
        ('"\ufffd\ufffd"', "invalid_utf8"),
        ('{"b": "]"}', None),
        ("3", None),  # a second array after the first: read too
        ('"c": 4', None),  # and an object's members, as for the chitchat corpus
        (", tail", "trailing_data"),
    ]
    bare = tmp_path / "bare.json"
    bare.write_text('"just a string"')
    assert list(iter_json_elements(str(bare), ReadSpec())) == [(1, '"just a string"', None)]


# ---------------------------------------------------------------- files: compression, byte-order marks, skipped names


def test_a_byte_order_mark_does_not_make_the_first_record_malformed(tmp_path):
    record = json.dumps(sharegpt(1))
    jsonl, array = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(BOM + f"{record}\n{record}\n".encode())
    array.write_bytes(BOM + f"[{record}]".encode())
    lines = list(iter_jsonl_range(str(jsonl), 0, jsonl.stat().st_size, ReadSpec()))
    (element,) = iter_json_elements(str(array), ReadSpec())
    rows = raw_rows("sharegpt", [(text, err) for _, text, err in [*lines, element]])
    assert [r["drop_reason"] for r in parse_raw_records(rows, {}, 1000)] == [None, None, None]
    assert lines[1][0] == len(BOM) + len(record) + 1  # offsets still count the mark


def write_lines(path, lines: list[str], codec: str | None = None) -> None:
    data = ("\n".join(lines) + "\n").encode()
    if codec == "gzip":
        path.write_bytes(gzip.compress(data))
    elif codec == "zstd":
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_a_directory_source_reads_compressed_and_differently_named_jsonl_and_lists_what_it_skips(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(5)]
    root = tmp_path / "dump"
    (root / "sub").mkdir(parents=True)
    write_lines(root / "a.jsonl.gz", lines, "gzip")
    write_lines(root / "b.JSONL.ZST", lines, "zstd")
    write_lines(root / "sub" / "c.ndjson", lines)
    write_lines(root / "d.Jsonl", lines)
    write_lines(root / "notes.txt", lines)
    write_lines(root / "e.parquet", lines)
    source = SourceSpec(name="s", format="openai", path=str(root))
    found = scan_source(source)
    assert [os.path.relpath(p, root) for p in found.files] == [
        "a.jsonl.gz",
        "b.JSONL.ZST",
        "d.Jsonl",
        "sub/c.ndjson",
    ]
    assert [os.path.relpath(p, root) for p in found.skipped] == ["e.parquet", "notes.txt"]
    files = ConversationFiles(source, ReadSpec(), counts_dir=str(tmp_path / "counts"))
    (tmp_path / "counts").mkdir()
    tables = [block for task in files.plan() for block in task.fn()]
    rows = [row for table in tables for row in table.to_pylist()]
    assert len(rows) == 4 * len(lines) and all(row["error"] is None for row in rows)
    counts = ReadCounts(str(tmp_path / "counts"), {task.key: task.what for task in files.plan()})
    assert counts.total() == (len(rows), [])


def test_a_cut_off_compressed_file_keeps_the_records_before_the_cut(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 5}]}) for i in range(20000)]
    whole = tmp_path / "whole.jsonl.gz"
    write_lines(whole, lines, "gzip")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rows = list(iter_jsonl_stream(str(cut), ReadSpec()))
    assert rows[-1][2] == "read_error" and "EOFError" in rows[-1][1]
    assert [text for _, text, _ in rows[:-1]] == lines[: len(rows) - 1]
    assert len(rows) > len(lines) // 3


def test_read_tasks_report_their_counts_and_a_missing_report_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, [json.dumps({"messages": []})] * 30 + ["not json"])
    counts_dir = tmp_path / "counts"
    counts_dir.mkdir()
    files = ConversationFiles(
        SourceSpec(name="s", format="openai", path=str(path)), ReadSpec(range_bytes=1 << 16), counts_dir=str(counts_dir)
    )
    (task,) = files.plan()
    counts = ReadCounts(str(counts_dir), {task.key: task.what})
    assert counts.total() == (0, [str(path) + f" bytes 0-{path.stat().st_size}"])
    assert sum(block.num_rows for block in task.fn()) == 31
    assert counts.total() == (31, [])
    assert sum(block.num_rows for block in task.fn()) == 31  # a retried task overwrites its count
    assert counts.total() == (31, [])


# ---------------------------------------------------------------- records that used to stop a run


def as_table(records):
    return records_to_table(records, RECORD_SCHEMA)  # what the read stage's UDF does with them


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "lone_surrogate"),
        ('{"messages": [{"role": "user", "content": "x"}], "\\udfff": 1}', "lone_surrogate"),
        ('{"id": "\\ud83d", "messages": [{"role": "user", "content": "x"}]}', "lone_surrogate"),
        ("[" * 100_000, "too_deep"),
        ('{"messages": [{"role": "user", "content": "x"}], "m": ' + "[" * 100 + "]" * 100 + "}", "too_deep"),
        ('{"messages": [{"role": "user", "content": "x"}], "n": ' + "9" * 5000 + "}", "invalid_json"),
    ],
)
def test_records_that_stopped_a_run_are_malformed_rows(raw, reason):
    rows = raw_rows("openai", [(raw, None), (json.dumps({"messages": [{"role": "user", "content": "ok"}]}), None)])
    records = parse_raw_records(rows, {}, 1000)
    assert [r["drop_reason"] for r in records] == [f"malformed:{reason}", None]
    assert as_table(records).num_rows == 2


def test_a_surrogate_pair_escape_is_one_character_and_kept():
    (record,) = parse_raw_records(
        raw_rows("openai", [('{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}', None)]), {}, 1000
    )
    assert record["drop_reason"] is None and record["messages"][0]["content"] == "smile \U0001f600"


def parquet_table(**columns) -> pa.Table:
    messages = pa.array([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 2)
    return pa.table({"messages": messages, **columns})


@pytest.mark.parametrize(
    ("columns", "reasons"),
    [
        ({"id": pa.array([1, 2])}, ["bad_id", "bad_id"]),
        ({"meta": pa.array([{"origin": "x"}, {"origin": "y"}])}, ["bad_meta", "bad_meta"]),
        ({"meta": pa.array(['{"a": 1}', "not json"])}, [None, "bad_meta"]),
        ({"meta": pa.array(["[1]", '{"k": "\\udc00"}'])}, ["bad_meta", "lone_surrogate"]),
        ({"id": pa.array(["a", None]), "meta": pa.array([None, '{"origin": "b"}'])}, [None, None]),
    ],
)
def test_parquet_rows_not_in_our_schema_are_malformed_rows(columns, reasons):
    udf = RecordBatchFn(
        functools.partial(check_parquet_records, source="p", role_map={}),
        stage="read",
        schema=RECORD_SCHEMA,
        to_records=parquet_rows,
    )
    out = udf(parquet_table(**columns)).to_pylist()
    assert [r["drop_reason"] for r in out] == [None if r is None else f"malformed:{r}" for r in reasons]


def test_parquet_files_of_other_schemas_are_read_each_with_its_own(tmp_path):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "g", "messages": messages, "extra": 1.5}]), parts / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": 7, "messages": messages}] * 3), parts / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{"meta": {"origin": "y"}, "messages": messages}]), parts / "c.parquet")
    (parts / "d.parquet").write_bytes(b"PAR1 not really")
    source = SourceSpec(name="pq", format="parquet", path=str(parts))
    with pytest.raises(SourceError, match=r"d\.parquet is not a readable Parquet file"):
        ConversationFiles(source, ReadSpec(block_rows=2)).plan()
    (parts / "d.parquet").unlink()
    (tmp_path / "counts").mkdir()
    files = ConversationFiles(source, ReadSpec(block_rows=2), counts_dir=str(tmp_path / "counts"))
    tables = [table for task in files.plan() for table in task.fn()]
    assert all(table.schema == RECORD_SCHEMA for table in tables)
    rows = [row for table in tables for row in table.to_pylist()]
    assert [r["drop_reason"] for r in rows] == [None] + ["malformed:bad_id"] * 3 + ["malformed:bad_meta"]
    assert [json.loads(r["meta"])["origin"] for r in rows[1:]] == [
        *(f"{parts / 'b.parquet'}#row={n}" for n in range(3)),
        f"{parts / 'c.parquet'}#row=0",
    ]
    assert ReadCounts(str(tmp_path / "counts"), {t.key: t.what for t in files.plan()}).total() == (5, [])


def test_parquet_text_that_is_not_utf8_spoils_only_its_row():
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x01\x00\x00\x00\x03\x00\x00\x00")
    ids = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"a\xff\xfe")])
    records = check_parquet_records(parquet_rows(parquet_table(id=ids)), source="p", role_map={})
    assert [r["drop_reason"] for r in records] == [None, "malformed:invalid_utf8"]
    assert records[0]["id"] == "a" and as_table(records).num_rows == 2


def test_a_sources_format_is_told_from_its_first_records(tmp_path):
    from chatforge.config import ReadSpec, SourceSpec
    from chatforge.data.sources import SourceError, check_format, first_records, sniff_format

    sharegpt = [{"id": i, "conversations": [{"from": "human", "value": "hi"}]} for i in range(30)]
    openai = [{"messages": [{"role": "user", "content": "hi"}]} for _ in range(3)]
    jsonl = tmp_path / "dump.jsonl"
    jsonl.write_text("not json\n" + "".join(json.dumps(r) + "\n" for r in sharegpt))
    array = tmp_path / "dump.json"
    array.write_text(json.dumps(openai))
    read = ReadSpec()
    assert len(first_records(str(jsonl), read)) == 20  # the bad line skipped
    assert sniff_format(first_records(str(jsonl), read)) == "sharegpt"
    assert sniff_format(first_records(str(array), read)) == "openai"
    assert sniff_format([{"text": "x"}, {"messages": []}, {"text": "y"}]) is None and sniff_format([]) is None

    check_format(SourceSpec(name="d", format="sharegpt", path=str(jsonl)), [str(jsonl)], read)
    with pytest.raises(SourceError, match=r"read as openai.*hold 'conversations' \(ShareGPT\): set its format to "
                                          r"sharegpt"):  # fmt: skip
        check_format(SourceSpec(name="d", format="openai", path=str(jsonl)), [str(jsonl)], read)
