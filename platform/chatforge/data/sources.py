"""Readers: conversation files -> raw rows -> records in our schema, streaming and split across Ray tasks.

Reading happens in two stages so that bad input never stops a run:
1. A Ray Data ``Datasource`` emits *raw* rows (the text of one record and where it came from). JSONL files are cut
   into byte ranges, one read task each; a JSON array (or the top-level object of the chitchat corpus) is scanned
   by one streaming task per file that never holds more than the current record.
2. ``parse_raw_records`` (a pure per-batch function, mapped in parallel) turns each raw row into a record, or into
   a row with ``drop_reason="malformed:<why>"`` that keeps the raw text.
"""

from __future__ import annotations

import codecs
import functools
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from chatforge.config import NormalizeSpec, ReadSpec, SourceSpec
from chatforge.data.schema import (
    BASE_SCHEMA,
    ROLES,
    STAGE_SECONDS_COLUMN,
    STAGE_SECONDS_TYPE,
    Record,
    make_id,
    map_records,
    with_columns,
)

RAW_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("format", pa.string()),
        ("origin", pa.string()),
        ("raw", pa.string()),
        ("error", pa.string()),
    ]
)

RECORD_SCHEMA = with_columns(BASE_SCHEMA, {STAGE_SECONDS_COLUMN: STAGE_SECONDS_TYPE})

# Source role vocabularies mapped on read (ShareGPT's human/gpt, OpenAI's user/assistant, common variants).
ROLE_VOCABULARY = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

EXTENSIONS = {
    "sharegpt": (".json", ".jsonl"),
    "openai": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "chitchat": (".json",),
}


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, no files); the message names it."""


def chitchat_corpus_path() -> str:
    """The conversation corpus shipped inside the `chitchat-dataset` PyPI package (a JSON object of 7k chats)."""
    import chitchat_dataset

    return os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")


def list_files(source: SourceSpec) -> list[str]:
    """The files of a source: a file, every matching file in a directory (recursively), or a glob."""
    if source.format == "chitchat" and source.path is None:
        return [chitchat_corpus_path()]
    assert source.path is not None
    path = os.path.expanduser(source.path)
    if os.path.isdir(path):
        found = [
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(EXTENSIONS[source.format])
        ]
    elif any(ch in path for ch in "*?["):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(path):
        found = [path]
    else:
        raise SourceError(f"source {source.name!r}: {source.path} does not exist")
    if not found:
        raise SourceError(f"source {source.name!r}: no {'/'.join(EXTENSIONS[source.format])} files under {path}")
    return sorted(found)


# ---------------------------------------------------------------- raw readers (run inside Ray read tasks)


def _first_significant_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _raw_row(source: str, fmt: str, origin: str, raw: str, error: str | None = None) -> dict[str, Any]:
    return {"source": source, "format": fmt, "origin": origin, "raw": raw, "error": error}


def _blocks(rows: Iterator[dict[str, Any]], block_rows: int) -> Iterator[pa.Table]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= block_rows:
            yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)


def iter_jsonl_range(path: str, start: int, end: int, read: ReadSpec) -> Iterator[tuple[int, str, str | None]]:
    """Yield (byte offset, text, error) for each line that *starts* in [start, end).

    A range that begins mid-line skips to the next line: that line belongs to the range it started in.
    """
    limit = read.max_record_bytes
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()
        while (offset := f.tell()) < end:
            line = f.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield offset, line[: read.raw_keep_bytes].decode("utf-8", "replace"), "record_too_large"
                continue
            if not line.strip():
                continue
            try:
                yield offset, line.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError:
                yield offset, line.decode("utf-8", "replace").rstrip("\r\n"), "invalid_utf8"


# A JSON string (escapes included), a bracket, a comma, or a lone quote: a string cut off by the buffer's end.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]|"')


def iter_json_elements(path: str, read: ReadSpec, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, str, str | None]]:
    """Yield (element number, raw text, error) for each element of a top-level JSON array or object, streaming.

    Only the current element is held in memory. For an object, an element is a ``"key": value`` member. An element
    over ``max_record_bytes`` is reported (its head kept) and skipped; a file cut off mid-element yields the
    partial element with error "truncated".
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf = ""
    scan = 0  # where the token scan resumes in buf
    start = None  # where the current element starts in buf (None before the top-level bracket)
    depth = 0
    number = 0
    oversize_head: str | None = None
    with open(path, "rb") as f:
        eof = False
        while not eof:
            data = f.read(chunk_chars)
            eof = not data
            buf += decoder.decode(data, final=eof)
            for match in _JSON_TOKEN.finditer(buf, scan):
                token = match.group()
                if token == '"' and not eof:
                    break  # an unterminated string: read more first
                scan = match.end()
                if token in "[{":
                    depth += 1
                    if depth == 1:
                        start = scan
                    continue
                if token in "]}":
                    depth -= 1
                    if depth > 0:
                        continue
                elif token != "," or depth != 1:
                    continue
                # An element ends here: a comma at depth 1, or the closing bracket.
                raw = buf[start : match.start()]
                if oversize_head is not None:
                    number += 1
                    yield number, oversize_head, "record_too_large"
                    oversize_head = None
                elif raw.strip():
                    number += 1
                    yield number, raw.strip(), None
                start = scan
                if depth == 0:
                    return
            if start is None:  # still before the top-level bracket
                buf, scan = buf[scan:], 0
                continue
            # Keep only the current element: drop what was consumed before it.
            buf, scan, start = buf[start:], scan - start, 0
            if len(buf) > read.max_record_bytes:
                oversize_head = oversize_head or buf[: read.raw_keep_bytes]
                buf, scan = buf[scan:], 0
    if oversize_head is not None:
        yield number + 1, oversize_head, "record_too_large"
    elif start is not None and buf.strip():
        yield number + 1, buf.strip()[: read.raw_keep_bytes], "truncated"


def _jsonl_task(path: str, start: int, end: int, source: str, fmt: str, read: ReadSpec) -> Iterator[pa.Table]:
    rows = (
        _raw_row(source, fmt, f"{path}@byte={offset}", text, error)
        for offset, text, error in iter_jsonl_range(path, start, end, read)
    )
    yield from _blocks(rows, read.block_rows)


def _json_task(path: str, source: str, fmt: str, read: ReadSpec) -> Iterator[pa.Table]:
    rows = (
        _raw_row(source, fmt, f"{path}#record={number}", text, error)
        for number, text, error in iter_json_elements(path, read)
    )
    yield from _blocks(rows, read.block_rows)


@dataclass
class ConversationFiles:
    """One source's files as Ray Data read tasks: JSONL byte ranges, or one streaming task per JSON document."""

    source: SourceSpec
    read: ReadSpec

    def tasks(self) -> list[tuple[functools.partial, int]]:
        planned = []
        for path in list_files(self.source):
            size = os.path.getsize(path)
            is_document = self.source.format == "chitchat" or _first_significant_byte(path) == b"["
            if is_document:
                planned.append(
                    (functools.partial(_json_task, path, self.source.name, self.source.format, self.read), size)
                )
                continue
            for start in range(0, max(size, 1), self.read.range_bytes):
                end = min(start + self.read.range_bytes, size)
                fn = functools.partial(_jsonl_task, path, start, end, self.source.name, self.source.format, self.read)
                planned.append((fn, end - start))
        return planned


def _make_datasource(files: ConversationFiles):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ConversationDatasource(Datasource):
        def __init__(self):
            super().__init__()
            self._planned = files.tasks()

        def get_name(self) -> str:
            return f"Read{files.source.format.capitalize()}"

        def estimate_inmemory_data_size(self) -> int:
            return sum(size for _, size in self._planned)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(fn, BlockMetadata(num_rows=None, size_bytes=size, input_files=None, exec_stats=None))
                for fn, size in self._planned
            ]

    return ConversationDatasource()


# ---------------------------------------------------------------- parsing (pure, per batch)


class RecordError(ValueError):
    """One record of the wrong shape: ``reason`` is the short drop-reason suffix, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def map_role(role: Any, extra: dict[str, str]) -> str:
    if not isinstance(role, str):
        raise RecordError("unknown_role", f"role must be a string, got {type(role).__name__}")
    key = role.strip().lower()
    mapped = extra.get(key) or ROLE_VOCABULARY.get(key)
    if mapped not in ROLES:
        raise RecordError("unknown_role", f"unknown role {role[:40]!r} (known: {', '.join(sorted(ROLE_VOCABULARY))})")
    return mapped


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise RecordError("non_string_content", f"{where}: content must be a string, got {type(content).__name__}")


def _turns(items: Any, role_key: str, content_key: str, extra: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise RecordError("missing_messages", f"messages must be a list, got {type(items).__name__}")
    if not items:
        raise RecordError("empty_conversation", "the conversation has no turns")
    turns = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError("bad_turn", f"turn {index} must be an object, got {type(item).__name__}")
        if role_key not in item or content_key not in item:
            raise RecordError(
                "bad_turn", f"turn {index} needs keys {role_key!r} and {content_key!r}, has {sorted(item)}"
            )
        role = map_role(item[role_key], extra)
        turns.append({"role": role, "content": _text_content(item[content_key], f"turn {index}")})
    return turns


def _parse_sharegpt(obj: Any, extra: dict[str, str]) -> tuple[str | None, list[dict[str, str]], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"a ShareGPT record is an object, got {type(obj).__name__}")
    if "conversations" not in obj:
        raise RecordError("missing_messages", f"a ShareGPT record needs 'conversations', has {sorted(obj)[:10]}")
    meta = {k: v for k, v in obj.items() if k not in ("id", "conversations")}
    return _source_id(obj.get("id")), _turns(obj["conversations"], "from", "value", extra), meta


def _parse_openai(obj: Any, extra: dict[str, str]) -> tuple[str | None, list[dict[str, str]], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"an OpenAI record is an object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise RecordError("missing_messages", f"an OpenAI record needs 'messages', has {sorted(obj)[:10]}")
    meta = {k: v for k, v in obj.items() if k not in ("id", "messages")}
    return _source_id(obj.get("id")), _turns(obj["messages"], "role", "content", extra), meta


def _parse_chitchat(member: Any, extra: dict[str, str]) -> tuple[str | None, list[dict[str, str]], dict[str, Any]]:
    """A chitchat member ``{"<uuid>": {"messages": [[utterance, ...], ...], "prompt", "ratings", "start"}}``.

    Each inner list is one speaker's turn; the speaker who opens is the user, the other the assistant.
    """
    if not isinstance(member, dict) or len(member) != 1:
        raise RecordError("not_an_object", "a chitchat record is one '\"id\": {...}' member")
    ((key, conv),) = member.items()
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list) or not conv["messages"]:
        raise RecordError("missing_messages", "a chitchat conversation needs a non-empty 'messages' list")
    first_sender = None
    turns = []
    for index, turn in enumerate(conv["messages"]):
        if not isinstance(turn, list) or not turn or not all(isinstance(u, dict) for u in turn):
            raise RecordError("bad_turn", f"turn {index} must be a non-empty list of utterances")
        texts = [u.get("text") for u in turn]
        if not all(isinstance(t, str) for t in texts):
            raise RecordError("non_string_content", f"turn {index}: utterance text must be a string")
        sender = turn[0].get("sender")
        first_sender = sender if first_sender is None else first_sender
        turns.append({"role": "user" if sender == first_sender else "assistant", "content": "\n".join(texts)})
    meta = {k: conv[k] for k in ("prompt", "ratings", "start") if k in conv}
    return str(key), turns, meta


def _source_id(value: Any) -> str | None:
    return None if value is None else str(value)


PARSERS = {"sharegpt": _parse_sharegpt, "openai": _parse_openai, "chitchat": _parse_chitchat}


def _malformed(row: dict[str, Any], reason: str, detail: str, keep: int) -> Record:
    raw = row["raw"] or ""
    return {
        "id": make_id(row["source"], None, None, f"{row['origin']}\n{raw}"),
        "source": row["source"],
        "messages": None,
        "meta": json.dumps({"origin": row["origin"], "error": detail[:500]}, ensure_ascii=False),
        "raw": raw[:keep],
        "drop_reason": f"malformed:{reason}",
    }


def parse_raw_records(rows: list[dict[str, Any]], role_map: dict[str, str], raw_keep_bytes: int) -> list[Record]:
    """Raw rows -> records in our schema; a record that cannot be read becomes a ``malformed:<why>`` row."""
    extra = {k.lower(): v for k, v in role_map.items()}
    out = []
    for row in rows:
        if row["error"]:
            detail = {
                "truncated": "the input ends in the middle of this record",
                "record_too_large": "the record is larger than read.max_record_bytes (head kept)",
                "invalid_utf8": "the record is not valid UTF-8",
            }.get(row["error"], row["error"])
            out.append(_malformed(row, row["error"], detail, raw_keep_bytes))
            continue
        text = row["raw"]
        if row["format"] == "chitchat":
            text = "{" + text + "}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            out.append(_malformed(row, "invalid_json", f"{err.msg} at column {err.colno}", raw_keep_bytes))
            continue
        try:
            source_id, messages, meta = PARSERS[row["format"]](obj, extra)
        except RecordError as err:
            out.append(_malformed(row, err.reason, str(err), raw_keep_bytes))
            continue
        meta = {"origin": row["origin"], **meta}
        out.append(
            {
                "id": make_id(row["source"], source_id, messages),
                "source": row["source"],
                "messages": messages,
                "meta": json.dumps(meta, ensure_ascii=False, default=str),
                "raw": None,
                "drop_reason": None,
            }
        )
    return out


def check_parquet_records(rows: list[dict[str, Any]], source: str, role_map: dict[str, str]) -> list[Record]:
    """Rows of a parquet file in our schema: validate messages and roles like any other source."""
    extra = {k.lower(): v for k, v in role_map.items()}
    out = []
    for row in rows:
        origin = row.get("meta") or "{}"
        try:
            messages = _turns(row.get("messages"), "role", "content", extra)
            out.append(
                {
                    "id": row.get("id") or make_id(source, None, messages),
                    "source": source,
                    "messages": messages,
                    "meta": row.get("meta") or "{}",
                    "raw": None,
                    "drop_reason": None,
                }
            )
        except RecordError as err:
            raw = json.dumps({k: row.get(k) for k in ("id", "messages", "meta")}, default=str)
            out.append(_malformed({"source": source, "origin": origin, "raw": raw}, err.reason, str(err), 1 << 20))
    return out


# ---------------------------------------------------------------- entry point


def read_source(source: SourceSpec, read: ReadSpec, normalize: NormalizeSpec):
    """A Ray Dataset of records (our schema) for one source; bad records are rows marked ``malformed:<why>``."""
    import ray.data

    if source.format == "parquet":
        ds = ray.data.read_parquet(list_files(source))
        fn = functools.partial(check_parquet_records, source=source.name, role_map=normalize.role_map)
        return map_records(ds, fn, stage="read", schema=RECORD_SCHEMA)
    ds = ray.data.read_datasource(_make_datasource(ConversationFiles(source, read)))
    fn = functools.partial(parse_raw_records, role_map=normalize.role_map, raw_keep_bytes=read.raw_keep_bytes)
    # The output schema is fixed (not inferred per block), so the sources can be unioned.
    return map_records(ds, fn, stage="read", schema=RECORD_SCHEMA)
