"""Record formats: the raw text of one record -> a conversation in our schema, or a ``malformed:<why>`` row.

Pure per-batch functions (mapped in parallel by `sources.read_source`, unit-tested without Ray). Role vocabularies
are mapped here, on read: ShareGPT's human/gpt, OpenAI's user/assistant, common variants, plus
``normalize.role_map``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

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
