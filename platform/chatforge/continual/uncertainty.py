"""Model uncertainty for active selection: the deployed model's mean NLL of each answer it gave.

An answer the model found unlikely (a high mean negative log-likelihood per token, in nats) is one it was unsure of;
those are the conversations most worth a human's look and a training step. The conversation is tokenized with the
model's chat template and the masks training uses (`tokenize_conversation`); only the final assistant turn, the
answer, is scored. A conversation whose answer does not fit in ``max_length`` tokens gets None.

On Ray, `add_uncertainty` scores the cycle's candidates with the model loaded once per actor of a pool, through
Ray Data, as evaluation generates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from chatforge.train.tokenize import IGNORE_INDEX, tokenize_conversation

UNCERTAINTY = "uncertainty"


def final_turn_labels(labels: list[int]) -> list[int]:
    """``labels`` with only the last run of supervised tokens (the final assistant turn) kept."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]


@torch.no_grad()
def answer_nll(model, tokenizer, conversations: Sequence[list[dict[str, str]]], max_length: int) -> list[float | None]:
    """Each conversation's final assistant turn's mean NLL per token under ``model`` (None when it does not fit)."""
    model.eval()
    scores: list[float | None] = []
    for messages in conversations:
        sample = tokenize_conversation(messages, tokenizer, max_length)
        if sample is None or messages[-1]["role"] != "assistant":
            scores.append(None)
            continue
        labels = torch.tensor([final_turn_labels(sample.labels)])
        logits = model(input_ids=torch.tensor([sample.input_ids])).logits.float()
        # position t predicts token t + 1, as in the model's own loss
        nll = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="mean"
        )
        scores.append(float(nll))
    return scores


class AnswerScorer:
    """A Ray Data actor UDF: loads the model once, then adds ``uncertainty`` to each batch of rows."""

    def __init__(self, model_dir: str, max_length: int, threads: int = 1) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        self.max_length = max_length

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        conversations = [[dict(turn) for turn in messages] for messages in batch["scored_messages"]]
        batch[UNCERTAINTY] = answer_nll(self.model, self.tokenizer, conversations, self.max_length)
        return batch


def add_uncertainty(
    rows: list[dict[str, Any]], model_dir: str, max_length: int, num_cpus: float = 1.0
) -> list[dict[str, Any]]:
    """``rows`` (each with ``scored_messages``: the prompt and the model's own answer) with ``uncertainty``, scored
    by ``model_dir`` in one actor on Ray; the order is kept."""
    import ray.data

    if not rows:
        return []
    indexed = [{"index": i, "scored_messages": row["scored_messages"]} for i, row in enumerate(rows)]
    scored = (
        ray.data.from_items(indexed)
        .map_batches(
            AnswerScorer,
            fn_constructor_kwargs={"model_dir": model_dir, "max_length": max_length, "threads": int(num_cpus)},
            batch_size=16,
            batch_format="pandas",
            concurrency=1,
            num_cpus=num_cpus,
        )
        .take_all()
    )
    by_index = {row["index"]: row[UNCERTAINTY] for row in scored}
    return [{**row, UNCERTAINTY: _finite_or_none(by_index[i])} for i, row in enumerate(rows)]


def _finite_or_none(value) -> float | None:
    import math

    return float(value) if value is not None and math.isfinite(value) else None
