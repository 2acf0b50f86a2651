import json

import pytest

from chatforge.config import ReadSpec, SourceSpec
from chatforge.data.formats import parse_raw_records
from chatforge.data.sources import (
    MIN_RANGE_BYTES,
    ConversationFiles,
    chitchat_corpus_path,
    iter_json_elements,
    iter_jsonl_range,
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
    # a tiny chunk size forces strings, escapes and multi-byte characters across chunk boundaries
    elements = list(iter_json_elements(str(path), ReadSpec(), chunk_chars=5))
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
    elements = list(iter_json_elements(str(path), read, chunk_chars=512))
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
