"""Record formats: the raw text of one record -> a conversation in our schema, or a ``malformed:<why>`` row.

Pure per-batch functions (mapped in parallel by `sources.read_source`, unit-tested without Ray). Role vocabularies
are mapped here, on read: ShareGPT's human/gpt, OpenAI's user/assistant, common variants, plus
``normalize.role_map``.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import pyarrow as pa

from chatforge.data.schema import ROLES, Record, make_id

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


# (format, list key, role key, content key) of the formats whose records hold a list of turns
TURN_FORMATS = {
    "sharegpt": ("ShareGPT", "conversations", "from", "value"),
    "openai": ("OpenAI", "messages", "role", "content"),
}


def _parse_turn_list(
    fmt: str, obj: Any, extra: dict[str, str]
) -> tuple[str | None, list[dict[str, str]], dict[str, Any]]:
    """A ShareGPT or OpenAI record: an object with an optional id and a list of turns."""
    label, list_key, role_key, content_key = TURN_FORMATS[fmt]
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"a {label} record is an object, got {type(obj).__name__}")
    if list_key not in obj:
        raise RecordError("missing_messages", f"a {label} record needs {list_key!r}, has {sorted(obj)[:10]}")
    meta = {k: v for k, v in obj.items() if k not in ("id", list_key)}
    return _source_id(obj.get("id")), _turns(obj[list_key], role_key, content_key, extra), meta


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


PARSERS = {
    "sharegpt": functools.partial(_parse_turn_list, "sharegpt"),
    "openai": functools.partial(_parse_turn_list, "openai"),
    "chitchat": _parse_chitchat,
}


READER_ERRORS = {  # the errors the readers report (as malformed:<error>), described
    "truncated": "the input ends in the middle of this record",
    "record_too_large": "the record is larger than read.max_record_bytes (head kept)",
    "invalid_utf8": "the record is not valid UTF-8",
    "trailing_data": "text after the end of the file's top-level JSON value",
    "read_error": "the file could not be read past this point (a corrupt or cut-off compressed file?)",
}

# A record whose ``meta`` (the fields it keeps besides id and turns) nests deeper than this is malformed: the steps
# walk meta recursively, and real records nest a few levels.
MAX_META_DEPTH = 64

# Only a \uD800-\uDFFF escape can put a surrogate into parsed JSON: a record whose text has none skips the check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def nests_deeper_than(value: Any, limit: int) -> bool:
    """True if lists and dicts in ``value`` nest more than ``limit`` levels (without recursing)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_meta(meta: dict[str, Any]) -> str:
    """``meta`` as the JSON text of the row; `RecordError` if the steps could not handle it."""
    nested = any(isinstance(value, (dict, list)) for value in meta.values())
    if nested and nests_deeper_than(meta, MAX_META_DEPTH):
        raise RecordError("too_deep", f"fields nest deeper than {MAX_META_DEPTH} levels")
    return json.dumps(meta, ensure_ascii=False, default=str)


def _check_text(*texts: str) -> None:
    """`RecordError` unless every text is valid Unicode: a \\ud800-\\udfff escape alone is half a surrogate pair,
    not a character, and no UTF-8 (so no Arrow string) can hold it."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("lone_surrogate", "a \\ud800-\\udfff escape that is not half of a pair") from None


def _malformed(row: dict[str, Any], reason: str, detail: str, keep: int) -> Record:
    raw = row["raw"] or ""
    detail = detail[:500].encode("utf-8", "backslashreplace").decode("utf-8")  # an error may quote a lone surrogate
    return {
        "id": make_id(row["source"], None, None, f"{row['origin']}\n{raw}"),
        "source": row["source"],
        "messages": None,
        "meta": json.dumps({"origin": row["origin"], "error": detail}, ensure_ascii=False),
        "raw": raw[:keep],
        "drop_reason": f"malformed:{reason}",
    }


def parse_record(row: dict[str, Any], extra: dict[str, str]) -> Record:
    """One raw row (no reader error) -> a record; `RecordError` says why it cannot be one."""
    text = row["raw"]
    try:
        obj = json.loads("{" + text + "}" if row["format"] == "chitchat" else text)
    except json.JSONDecodeError as err:
        raise RecordError("invalid_json", f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RecordError("too_deep", "arrays or objects nest too deeply to parse") from None
    except ValueError as err:  # an integer of more digits than Python converts, say
        raise RecordError("invalid_json", str(err)) from None
    source_id, messages, meta = PARSERS[row["format"]](obj, extra)
    meta_text = _check_meta({"origin": row["origin"], **meta})
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        _check_text(source_id or "", meta_text, *(m["content"] for m in messages))
    return {
        "id": make_id(row["source"], source_id, messages),
        "source": row["source"],
        "messages": messages,
        "meta": meta_text,
        "raw": None,
        "drop_reason": None,
    }


def parse_raw_records(rows: list[dict[str, Any]], role_map: dict[str, str], raw_keep_bytes: int) -> list[Record]:
    """Raw rows -> records in our schema; a record that cannot be read becomes a ``malformed:<why>`` row.

    One row in, one row out, whatever the input: errors are caught per record.
    """
    extra = {k.lower(): v for k, v in role_map.items()}
    out = []
    for row in rows:
        if row["error"]:
            detail = READER_ERRORS.get(row["error"], row["error"])
            out.append(_malformed(row, row["error"], detail, raw_keep_bytes))
            continue
        try:
            out.append(parse_record(row, extra))
        except RecordError as err:
            out.append(_malformed(row, err.reason, str(err), raw_keep_bytes))
        except Exception as err:  # one record's surprise must not fail the batch (and the run)
            out.append(_malformed(row, "unreadable", f"{type(err).__name__}: {err}", raw_keep_bytes))
    return out


# ---------------------------------------------------------------- Parquet in our schema

UNREADABLE_ROW = "_unreadable"  # a Parquet row whose strings are not UTF-8: the error, in place of its fields


def parquet_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A Parquet batch's rows as dicts. Parquet does not check that strings are UTF-8, and a batch with one that is
    not fails to convert whole: then each row is converted alone, and one that fails is ``{UNREADABLE_ROW: why}``."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        rows = []
        for index in range(table.num_rows):
            try:
                rows.append(table.slice(index, 1).to_pylist()[0])
            except UnicodeDecodeError as err:
                rows.append({UNREADABLE_ROW: str(err)})
        return rows


def check_parquet_record(row: dict[str, Any], source: str, extra: dict[str, str]) -> Record:
    """A Parquet row in our schema -> a record; `RecordError` if a column is of another type or its text is bad."""
    if UNREADABLE_ROW in row:
        raise RecordError("invalid_utf8", f"a string is not UTF-8: {row[UNREADABLE_ROW]}")
    source_id, meta_text = row.get("id"), row.get("meta")
    if source_id is not None and not isinstance(source_id, str):
        raise RecordError("bad_id", f"id must be a string, got {type(source_id).__name__}")
    if meta_text is not None and not isinstance(meta_text, str):
        raise RecordError("bad_meta", f"meta must be a JSON string, got {type(meta_text).__name__}")
    try:
        meta = json.loads(meta_text or "{}")
    except RecursionError:
        raise RecordError("too_deep", "meta nests too deeply to parse") from None
    except ValueError as err:
        raise RecordError("bad_meta", f"meta is not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise RecordError("bad_meta", f"meta must be a JSON object, got {type(meta).__name__}")
    messages = _turns(row.get("messages"), "role", "content", extra)
    checked_meta = _check_meta(meta)
    if meta_text and _SURROGATE_ESCAPE.search(meta_text):  # Parquet's strings are UTF-8: only meta's escapes can fail
        _check_text(checked_meta)
    return {
        "id": source_id or make_id(source, None, messages),
        "source": source,
        "messages": messages,
        "meta": checked_meta,
        "raw": None,
        "drop_reason": None,
    }


def check_parquet_records(
    rows: list[dict[str, Any]], source: str, role_map: dict[str, str], origin: str = "", first_row: int = 0
) -> list[Record]:
    """Rows of a parquet file in our schema: validate types, messages and roles like any other source.

    One row in, one row out: a row that is not in our schema becomes a ``malformed:<why>`` row whose origin is
    ``<origin>#row=<n>`` (``rows`` being the file's rows from ``first_row`` on).
    """
    extra = {k.lower(): v for k, v in role_map.items()}
    out = []
    for index, row in enumerate(rows, first_row):
        try:
            out.append(check_parquet_record(row, source, extra))
        except Exception as err:  # one record's surprise must not fail the batch (and the run)
            reason = err.reason if isinstance(err, RecordError) else "unreadable"
            fields = {k: row.get(k) for k in ("id", "messages", "meta")} if UNREADABLE_ROW not in row else {}
            raw = json.dumps(fields, default=str)  # ASCII, so any lone surrogate is escaped
            where = {"source": source, "origin": f"{origin or source}#row={index}", "raw": raw}
            out.append(_malformed(where, reason, str(err), 1 << 20))
    return out
