"""Active selection: which feedback conversations a human reviews first, and which the next training round takes.

Candidates rank by, in order: the lowest rating, the highest model uncertainty (mean token NLL of the answer under
the deployed model, the ``uncertainty`` field, when measured), and A/B disagreement (the spread of the mean ratings
that different variants got for the same prompt).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any


def prompt_key(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode(), digest_size=12).hexdigest()


def add_disagreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with ``disagreement``: for a prompt that two or more variants answered, the highest mean rating of a
    variant minus the lowest, halved (0..1); 0 for a prompt only one variant answered."""
    ratings: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("rating") is not None:
            ratings[prompt_key(row["prompt"])][row["variant"]].append(row["rating"])
    spread = {}
    for key, by_variant in ratings.items():
        means = [sum(r) / len(r) for r in by_variant.values()]
        spread[key] = (max(means) - min(means)) / 2 if len(means) > 1 else 0.0
    return [{**row, "disagreement": spread.get(prompt_key(row["prompt"]), 0.0)} for row in rows]


def rank_key(row: dict[str, Any]) -> tuple[float, float, float]:
    rating = row.get("rating")
    uncertainty = row.get("uncertainty")
    return (
        rating if rating is not None else 0,
        -(uncertainty if uncertainty is not None else 0.0),
        -row.get("disagreement", 0.0),
    )


def select(rows: list[dict[str, Any]], size: int | None) -> list[dict[str, Any]]:
    """The ``size`` highest-ranked rows (all, ranked, when None); ties keep their order (feedback id)."""
    ranked = sorted(rows, key=rank_key)
    return ranked if size is None else ranked[: max(size, 0)]
