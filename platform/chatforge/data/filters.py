"""Filters: reject conversations a chat model should not be trained on, naming the first reason.

Checks, in order: turn count, empty turns, message and total length, role order, an assistant turn, token
length, language. A rejected record keeps its row with ``drop_reason`` set (mark, don't filter).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from chatforge.config import FiltersSpec
from chatforge.data.schema import Record, RecordBatchFn, RecordStep, is_kept, mark_dropped

FILTER_COLUMNS = {"n_turns": pa.int32(), "n_chars": pa.int64(), "lang": pa.string()}

_WORD_PIECES = re.compile(r"\w+|[^\w\s]")
_LANG_SAMPLE_CHARS = 2000


def role_order_problem(messages: list[dict[str, str]]) -> str | None:
    """Why the roles are out of order, or None: an optional system turn first, then user/assistant alternating."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "a system turn after the first turn"
    dialogue = roles[1:] if roles and roles[0] == "system" else roles
    if dialogue and dialogue[0] != "user":
        return "the dialogue does not open with a user turn"
    for previous, current in zip(dialogue, dialogue[1:]):
        if previous == current:
            return f"two {current} turns in a row"
    return None


@functools.lru_cache(maxsize=4)
def _token_counter(tokenizer: str | None) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda text: len(_WORD_PIECES.findall(text))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: len(loaded(text, add_special_tokens=False)["input_ids"])


def detect_language(text: str) -> str:
    import py3langid

    return py3langid.classify(text[:_LANG_SAMPLE_CHARS])[0]


def filter_reason(messages: list[dict[str, str]], spec: FiltersSpec) -> tuple[str | None, list[dict[str, str]]]:
    """The first reason to reject a conversation (None to keep it), and its messages (empty turns removed when
    ``drop_empty_turns`` is off)."""
    if not spec.drop_empty_turns:
        messages = [m for m in messages if m["content"].strip()]
    elif any(not m["content"].strip() for m in messages):
        return "empty_turn", messages
    if len(messages) < spec.min_turns:
        return "too_few_turns", messages
    if len(messages) > spec.max_turns:
        return "too_many_turns", messages
    if any(len(m["content"]) > spec.max_message_chars for m in messages):
        return "message_too_long", messages
    if sum(len(m["content"]) for m in messages) > spec.max_total_chars:
        return "too_long", messages
    if spec.require_alternation and role_order_problem(messages):
        return "role_order", messages
    if spec.require_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn", messages
    if spec.max_tokens is not None:
        count = _token_counter(spec.tokenizer)
        if sum(count(m["content"]) for m in messages) > spec.max_tokens:
            return "too_many_tokens", messages
    return None, messages


def filter_records(records: list[Record], spec: FiltersSpec) -> list[Record]:
    for record in records:
        record.update(n_turns=None, n_chars=None, lang=None)
        if not is_kept(record):
            continue
        reason, record["messages"] = filter_reason(record["messages"], spec)
        record["n_turns"] = len(record["messages"])
        record["n_chars"] = sum(len(m["content"]) for m in record["messages"])
        if reason is None and spec.languages is not None:
            record["lang"] = detect_language(
                " ".join(m["content"] for m in record["messages"] if m["role"] != "system")
            )
            if record["lang"] not in spec.languages:
                reason = f"language:{record['lang']}"
        if reason:
            mark_dropped(record, reason)
    return records


@dataclass(frozen=True)
class FiltersStep(RecordStep):
    spec: FiltersSpec

    def record_fn(self) -> RecordBatchFn:
        return RecordBatchFn(functools.partial(filter_records, spec=self.spec), stage="filters", adds=FILTER_COLUMNS)
