"""A ShareGPT-shaped dump that holds what real ones do, each record labelled with what curation should make of it.

Real ShareGPT dumps cut long conversations into parts ``<id>_0``, ``<id>_1``, ...; every later part opens with the
``gpt`` turn that answers the question its previous part ended on, and a part can be a lone answer. Some
conversations hold two turns of one role in a row (a user writing twice, an answer continued in a second turn), a
few open with a system prompt. Some records are broken beyond repair: no turns, no answer, an empty turn, a role
outside the vocabulary, text that is not JSON.

A record's label says what curation with the default filters should do: keep it (``expected is None``) or drop it
with ``expected`` as the reason, and which repairs it needs. Labels follow from how the record was built, not from
running the filters, so a test can check every record.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass

from helpers.corpus import sentence

ROLE_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass(frozen=True)
class DumpRecord:
    id: str
    text: str  # the record as it sits in the dump (JSON, or broken JSON)
    expected: str | None  # the drop reason curation should give it; None: kept
    repairs: tuple[str, ...] = ()  # the repairs a kept record needs, in the order the filters name them
    messages: tuple[dict[str, str], ...] = ()  # its turns as written (roles in our vocabulary)


def _turn(rng: random.Random, role: str) -> dict[str, str]:
    return {"role": role, "content": " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 2)))}


def _thread(rng: random.Random, pairs: int) -> list[dict[str, str]]:
    return [_turn(rng, role) for _ in range(pairs) for role in ("user", "assistant")]


def _text(record_id: str, messages: list[dict[str, str]]) -> str:
    turns = [{"from": ROLE_NAMES.get(m["role"], m["role"]), "value": m["content"]} for m in messages]
    return json.dumps({"id": record_id, "conversations": turns})


def _with_run(rng: random.Random, messages: list[dict[str, str]], first: int) -> list[dict[str, str]]:
    """``messages`` with one more turn right after a turn at ``first`` or later, of that turn's role."""
    at = rng.randrange(first, len(messages))
    return messages[: at + 1] + [_turn(rng, messages[at]["role"])] + messages[at + 1 :]


def _parts(rng: random.Random, messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """A long conversation cut before assistant turns, as the dumps cut it: later parts open with an answer.

    Parts hold a few exchanges; now and then an answer too long to share a part is a part of its own at the end."""
    cuts: list[int] = []
    places = range(3, len(messages) - 2, 2)  # before an answer, leaving the last part an exchange
    for cut in sorted(rng.sample(places, min(rng.randint(1, 3), len(places)))):
        if not cuts or cut - cuts[-1] >= 4:
            cuts.append(cut)
    if rng.random() < 0.15 and len(messages) - 1 - cuts[-1] >= 4:
        cuts.append(len(messages) - 1)
    bounds = [0, *cuts, len(messages)]
    return [messages[a:b] for a, b in zip(bounds, bounds[1:])]


def _conversation_records(rng: random.Random, thread_id: str) -> list[DumpRecord]:
    split = rng.random() < 0.35
    messages = _thread(rng, rng.randint(4, 12) if split else rng.randint(1, 5))
    if not split and rng.random() < 0.05:
        messages = [{"role": "system", "content": "You are a helpful assistant."}, *messages]
    records = []
    for number, part in enumerate(_parts(rng, messages) if split else [messages]):
        leading = part[0]["role"] == "assistant"
        dialogue_start = 1 if leading or part[0]["role"] == "system" else 0
        remaining = len(part) - (1 if leading else 0)  # turns left once the leading answer is trimmed
        repairs = ["leading_assistant"] if leading else []
        if remaining >= 2 and rng.random() < 0.08:
            part = _with_run(rng, part, dialogue_start)
            repairs.append("merged_turns")
        expected = None if remaining >= 2 else "too_few_turns"
        kept_repairs = tuple(repairs) if expected is None else ()
        record_id = f"{thread_id}_{number}"
        records.append(DumpRecord(record_id, _text(record_id, part), expected, kept_repairs, tuple(part)))
    return records


def _broken_record(rng: random.Random, record_id: str) -> DumpRecord:
    kind = rng.choice(["empty", "no_answer", "question_only", "empty_turn", "unknown_role", "invalid_json"])
    if kind == "empty":
        return DumpRecord(record_id, _text(record_id, []), "malformed:empty_conversation")
    if kind == "no_answer":  # a question asked twice, never answered: merged, then too short
        return DumpRecord(record_id, _text(record_id, [_turn(rng, "user"), _turn(rng, "user")]), "too_few_turns")
    if kind == "question_only":
        system = {"role": "system", "content": "You are a helpful assistant."}
        return DumpRecord(record_id, _text(record_id, [system, _turn(rng, "user")]), "no_assistant_turn")
    if kind == "empty_turn":  # an answer that failed to generate
        messages = [*_thread(rng, rng.randint(1, 3)), _turn(rng, "user"), {"role": "assistant", "content": ""}]
        return DumpRecord(record_id, _text(record_id, messages), "empty_turn")
    if kind == "unknown_role":
        messages = [*_thread(rng, 1), {"role": "observation", "content": '{"temperature": 21}'}]
        return DumpRecord(record_id, _text(record_id, messages), "malformed:unknown_role")
    text = _text(record_id, _thread(rng, 2)).replace('", "value"', '" "value"', 1)  # a comma lost
    return DumpRecord(record_id, text, "malformed:invalid_json")


def sharegpt_dump(n_records: int, seed: int = 0, broken_share: float = 0.08) -> list[DumpRecord]:
    """About ``n_records`` labelled records (whole conversations are not cut short to hit the number exactly)."""
    rng = random.Random(seed)
    used: set[str] = set()
    records: list[DumpRecord] = []
    while len(records) < n_records:
        thread_id = "".join(rng.choices(string.ascii_letters + string.digits, k=7))
        if thread_id in used:
            continue
        used.add(thread_id)
        if rng.random() < broken_share:
            records.append(_broken_record(rng, f"{thread_id}_0"))
        else:
            records += _conversation_records(rng, thread_id)
    return records


def write_sharegpt_dump(path, records: list[DumpRecord], fmt: str = "json") -> None:
    """The records as one JSON array (how ShareGPT dumps ship), or as JSONL (``fmt="jsonl"``)."""
    texts = [r.text for r in records]
    body = "[\n" + ",\n".join(texts) + "\n]\n" if fmt == "json" else "\n".join(texts) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
