"""Filters: repair conversations whose turns are merely out of shape, reject those a chat model should not be
trained on, naming the first reason.

In order: empty turns, role repairs (leading assistant turns trimmed, turns of one role in a row merged), turn
count, message and total length, role order, an assistant turn, token length, language. Repairs run before the
checks, so a conversation a repair leaves without an exchange is still rejected, with the check's reason. A
rejected record keeps its row with ``drop_reason`` set (mark, don't filter); a repaired one lists its repairs in
``repairs`` and keeps the messages it came with in ``meta.original_messages``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa

from chatforge.config import FiltersSpec
from chatforge.data.batches import RecordBatchFn, RecordStep
from chatforge.data.schema import ORIGINAL_MESSAGES, Record, is_kept, mark_dropped

FILTER_COLUMNS = {
    "n_turns": pa.int32(),
    "n_chars": pa.int64(),
    "lang": pa.string(),
    "repairs": pa.list_(pa.string()),
}

# What `repair_turns` can do to a conversation, as named in the ``repairs`` column and the manifest's ``repaired``.
LEADING_ASSISTANT = "leading_assistant"
MERGED_TURNS = "merged_turns"
REPAIRS = (LEADING_ASSISTANT, MERGED_TURNS)
TURN_SEPARATOR = "\n\n"  # between the contents of merged turns

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


def trim_leading_assistant(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without the assistant turns that open its dialogue (after an optional system turn).

    A later part of a ShareGPT conversation split into parts opens with the answer to a question left in the
    previous part; the turns from the first user turn on are still a conversation."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    start = head
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    return messages if start == head else messages[:head] + messages[start:]


def merge_consecutive_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation with each run of turns of one role made one turn, contents joined by a blank line."""
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            previous = merged[-1]
            merged[-1] = {
                "role": previous["role"],
                "content": previous["content"] + TURN_SEPARATOR + message["content"],
            }
        else:
            merged.append(message)
    return merged


def repair_turns(messages: list[dict[str, str]], spec: FiltersSpec) -> tuple[list[dict[str, str]], list[str]]:
    """The messages after the repairs ``spec`` allows, and the names of those that changed something (`REPAIRS`).

    Trimming runs first, so assistant turns that open the dialogue are removed rather than merged."""
    repairs = []
    if spec.leading_assistant == "trim":
        trimmed = trim_leading_assistant(messages)
        if len(trimmed) < len(messages):
            messages = trimmed
            repairs.append(LEADING_ASSISTANT)
    if spec.consecutive_turns == "merge":
        merged = merge_consecutive_turns(messages)
        if len(merged) < len(messages):
            messages = merged
            repairs.append(MERGED_TURNS)
    return messages, repairs


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


class Verdict(NamedTuple):
    reason: str | None  # the first reason to reject the conversation; None keeps it
    messages: list[dict[str, str]]  # as checked: empty turns removed (drop_empty_turns off), repairs applied
    repairs: list[str]  # the repairs that changed the messages (`REPAIRS`)


def filter_reason(messages: list[dict[str, str]], spec: FiltersSpec) -> Verdict:
    """The first reason to reject a conversation, checked after the repairs the spec allows (see `Verdict`)."""
    if not spec.drop_empty_turns:
        messages = [m for m in messages if m["content"].strip()]
    elif any(not m["content"].strip() for m in messages):
        return Verdict("empty_turn", messages, [])
    repairs: list[str] = []
    if spec.require_alternation:
        messages, repairs = repair_turns(messages, spec)
    reason = _first_failed_check(messages, spec)
    return Verdict(reason, messages, repairs)


def _first_failed_check(messages: list[dict[str, str]], spec: FiltersSpec) -> str | None:
    if len(messages) < spec.min_turns:
        return "too_few_turns"
    if len(messages) > spec.max_turns:
        return "too_many_turns"
    if any(len(m["content"]) > spec.max_message_chars for m in messages):
        return "message_too_long"
    if sum(len(m["content"]) for m in messages) > spec.max_total_chars:
        return "too_long"
    if spec.require_alternation and role_order_problem(messages):
        return "role_order"
    if spec.require_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    if spec.max_tokens is not None:
        count = _token_counter(spec.tokenizer)
        if sum(count(m["content"]) for m in messages) > spec.max_tokens:
            return "too_many_tokens"
    return None


def filter_records(records: list[Record], spec: FiltersSpec) -> list[Record]:
    for record in records:
        record.update(n_turns=None, n_chars=None, lang=None, repairs=None)
        if not is_kept(record):
            continue
        reason, messages, record["repairs"] = filter_reason(record["messages"], spec)
        if record["repairs"]:
            meta = json.loads(record["meta"] or "{}")
            meta[ORIGINAL_MESSAGES] = record["messages"]
            record["meta"] = json.dumps(meta, ensure_ascii=False)
        record["messages"] = messages
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
