"""Perplexity on held-out conversations, counted on assistant tokens only, with the masks training uses.

The conversations are tokenized by `tokenize_conversation` (the model's chat template, labels on assistant tokens
and their end-of-turn token) and packed into rows the way training packs them, so the figure is exp of the mean
per-token loss that `eval_loss` reports in training, over every supervised token of the split (token-weighted, not
a mean of per-conversation perplexities).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq
import torch

from chatforge.train.tokenize import IGNORE_INDEX, collate, make_rows, model_inputs, tokenize_conversation


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per supervised token
    tokens: int  # supervised tokens scored
    conversations: int  # conversations scored
    skipped: int  # conversations with no supervised token left after truncation

    def as_dict(self) -> dict:
        return asdict(self)


def read_conversations(data_dir: str, split: str = "test", limit: int | None = None) -> list[list[dict[str, str]]]:
    """The ``messages`` of a curated split (``DATA/<split>/*.parquet``), in file order."""
    directory = os.path.join(data_dir, split)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{data_dir}: no {split}/ split here; pass a curation output's data/ directory")
    conversations = pq.read_table(directory, columns=["messages"]).column("messages").to_pylist()
    return conversations[:limit] if limit is not None else conversations


@torch.no_grad()
def perplexity(
    model, tokenizer, conversations: list[list[dict[str, str]]], max_length: int = 512, batch_size: int = 8
) -> Perplexity:
    """Token-weighted perplexity of ``model`` on the assistant tokens of ``conversations``."""
    samples = [tokenize_conversation(messages, tokenizer, max_length) for messages in conversations]
    usable = [s for s in samples if s is not None]
    rows = list(make_rows(usable, max_length, tokenizer.pad_token_id, packing=True))
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.float()
        # position t predicts token t + 1, as in the model's own loss
        shifted = labels[:, 1:].reshape(-1)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((shifted != IGNORE_INDEX).sum())
    mean = total_nll / total_tokens if total_tokens else float("nan")
    return Perplexity(
        perplexity=math.exp(mean) if total_tokens else float("nan"),
        mean_nll=mean,
        tokens=total_tokens,
        conversations=len(usable),
        skipped=len(samples) - len(usable),
    )


def model_perplexity(
    model_ref: str, data_dir: str, split: str = "test", max_length: int = 512, limit: int | None = None
) -> Perplexity:
    """`perplexity` of a model dir (or any `model.name_or_path` form) on a curated split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.train.pretrained import model_path

    path = model_path(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return perplexity(model, tokenizer, read_conversations(data_dir, split, limit), max_length)
