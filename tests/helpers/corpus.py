"""Synthetic conversation corpora for tests and benchmarks: varied, seeded, with PII and near-copies on demand."""

from __future__ import annotations

import json
import random

WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education garden river mountain ocean forest "
    "coffee music movie recipe travel weather dog cat bicycle train airport holiday museum library market kitchen "
    "bread cheese apple orange guitar piano painting poem novel science planet star rocket engine bridge castle "
    "village island desert valley storm winter summer autumn spring sunset breakfast dinner lunch birthday wedding"
).split()
VERBS = (
    "likes visits builds paints reads writes finds loves watches plans cooks repairs studies explores shares".split()
)
ADJ = "quiet bright small large old new green blue warm cold busy calm strange lovely simple clever funny".split()


def sentence(rng: random.Random, n_words: int = 12) -> str:
    parts = []
    for i in range(n_words):
        pool = (WORDS, VERBS, ADJ)[i % 3] if i % 4 else WORDS
        parts.append(rng.choice(pool))
    return " ".join(parts).capitalize() + "."


def conversation(
    rng: random.Random, turns: int | None = None, words: tuple[int, int] = (8, 20)
) -> list[dict[str, str]]:
    turns = turns or rng.choice([2, 4, 6])
    messages = []
    for t in range(turns):
        text = " ".join(sentence(rng, rng.randint(*words)) for _ in range(rng.randint(1, 3)))
        messages.append({"role": "user" if t % 2 == 0 else "assistant", "content": text})
    return messages


def change_one_word(messages: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    copy = [dict(m) for m in messages]
    target = rng.randrange(len(copy))
    words = copy[target]["content"].split(" ")
    i = rng.randrange(len(words))
    words[i] = rng.choice([w for w in WORDS if w != words[i]])
    copy[target]["content"] = " ".join(words)
    return copy


PII_SNIPPETS = [
    "mail me at jane.doe{n}@example.com",
    "call +1 415-555-{n:04d}",
    "my card is 4111 1111 1111 1111",
    "IBAN DE89 3704 0044 0532 0130 00",
    "server at 10.0.{m}.{m}",
    "key sk-proj-{n:04d}abcdefghijklmnopqrstuvwx",
]


def sharegpt_record(rid: str, messages: list[dict[str, str]]) -> dict:
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"id": rid, "conversations": [{"from": role[m["role"]], "value": m["content"]} for m in messages]}


def write_sharegpt_jsonl(path, n: int, seed: int = 0, pii_every: int = 0, near_every: int = 0) -> int:
    """n conversations as ShareGPT JSONL; every pii_every-th gets PII, every near_every-th is a near-copy."""
    rng = random.Random(seed)
    previous = None
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if near_every and previous is not None and i % near_every == 0:
                messages = change_one_word(previous, rng)
            else:
                messages = conversation(rng)
            if pii_every and i % pii_every == 0:
                snippet = rng.choice(PII_SNIPPETS).format(n=i % 10000, m=i % 250)
                messages[0]["content"] += " " + snippet
            previous = messages
            f.write(json.dumps(sharegpt_record(f"c{i}", messages)) + "\n")
    return n
