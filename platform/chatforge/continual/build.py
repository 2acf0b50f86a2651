"""Feedback rows to conversations: what trains, what a human reviews, and what neither.

A row is one rated completion (`chatforge.serve.feedback.read_feedback`). Its conversation is the prompt's messages
and one final assistant turn:
  correction   a user's correction (whatever the rating) is the answer: trains
  liked        rated +1, answered under the guard's ``pass``: the model's own answer trains
  disliked     rated -1 without a correction: to the review queue, never to training
  guarded      rated +1 or 0 but flagged or blocked by the guard: to the review queue
  neutral      rated 0: neither
Each row becomes a conversation record (`chatforge.data.schema`) with ``use`` (train, review, skip) and ``kind``, and
its origin in ``meta``, so the curation steps that follow treat it like any other source.
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.data.schema import ROLES

SOURCE = "feedback"
USES = ("train", "review", "skip")


def classify(rating: int | None, correction: str | None, guard: str | None) -> tuple[str, str]:
    """(use, kind) of one rated completion."""
    if correction and correction.strip():
        return "train", "correction"
    if rating == -1:
        return "review", "disliked"
    if guard not in (None, "pass"):
        return "review", "guarded"
    if rating == 1:
        return "train", "liked"
    return "skip", "neutral"


def prompt_messages(prompt: str) -> list[dict[str, str]] | None:
    """The stored prompt (a JSON list of role/content turns) as messages; None when it is not one."""
    try:
        turns = json.loads(prompt)
    except (TypeError, ValueError):
        return None
    if not isinstance(turns, list) or not turns:
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return None
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def conversation(row: dict[str, Any]) -> dict[str, Any]:
    """One feedback row as a conversation record with ``use`` and ``kind`` (a bad stored prompt: ``skip``)."""
    use, kind = classify(row.get("rating"), row.get("correction"), row.get("guard"))
    messages = prompt_messages(row.get("prompt"))
    if messages is None:
        use, kind, messages = "skip", "bad_prompt", []
    else:
        answer = row["correction"] if kind == "correction" else row.get("answer") or ""
        messages.append({"role": "assistant", "content": answer})
    meta = {
        "completion_id": row.get("completion_id"),
        "feedback_id": row.get("feedback_id"),
        "variant": row.get("variant"),
        "rating": row.get("rating"),
        "guard": row.get("guard"),
        "answer": row.get("answer") if kind == "correction" else None,  # the model's own, which was corrected
    }
    return {
        "id": f"{SOURCE}:{row.get('feedback_id')}",
        "source": SOURCE,
        "messages": messages,
        "meta": json.dumps(meta),
        "raw": None,
        "drop_reason": None,
        "use": use,
        "kind": kind,
    }
