"""Per-sequence decisions of the generation engine: which token comes next, and how much of the text may be streamed.

Sampling works on one row of logits with the request's own generator, so a request's draws depend only on its own
seed and logits, never on what else shares the batch. The text helpers implement stop sequences over decoded text:
a streamed suffix that could still grow into a stop sequence is held back until it cannot.
"""

from __future__ import annotations

import torch

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for the incomplete UTF-8 bytes of a character split over tokens
# Below this, sampling is argmax up to float precision, and logits / temperature can overflow to inf (then NaN).
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token id from one row of fp32 logits: argmax at (near) temperature 0, else nucleus sampling."""
    if is_greedy(temperature):
        return int(torch.argmax(logits))
    # shifted so the largest is 0: the scaled logits are <= 0, so exp never overflows whatever the temperature
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the most likely token always stays)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) pairs of one row, most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence starts in ``text``, or None."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` must wait: an incomplete character, or a possible stop-sequence start."""
    n = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
    visible = text[: len(text) - n]
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(visible)), longest, -1):
            if visible.endswith(stop[:size]):
                longest = size
                break
    return n + longest
