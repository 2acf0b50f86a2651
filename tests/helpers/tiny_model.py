"""A tiny exported chat model for serving tests: a 2-layer GPT-2 with a BPE tokenizer, laid out like `chatforge train`'s.

The directory holds what a real export holds (config, safetensors weights, tokenizer, chat template, generation
config whose stop ids include ``<|im_end|>``). Weights are random but seeded, so the same arguments give the same
model. Its matrices are drawn wider than GPT-2's 0.02 init: at 0.02 a tiny random model answers every prompt with one
repeated token, while at 0.4 the greedy answer varies with the prompt and from token to token, which tests of
batching and sampling need in order to mean something.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from chatforge.config import ModelSpec
from chatforge.train.model import build_model, train_tokenizer
from helpers.corpus import conversation

VOCAB_SIZE = 400
WEIGHT_STD = 0.4


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [message["content"] for _ in range(n // 2) for message in conversation(rng, turns=2, words=(4, 12))]


def save_tiny_model(path: Path, n_positions: int = 128) -> Path:
    """Train a tokenizer, build a tiny random GPT-2, save both to ``path``; returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_texts(), VOCAB_SIZE)
    spec = ModelSpec(
        name_or_path="scratch",
        n_layer=2,
        n_embd=32,
        n_head=2,
        max_length=n_positions,
        vocab_size=VOCAB_SIZE,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = build_model(spec, tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # embeddings and projections; layer norms and biases keep their init
                param.normal_(0.0, WEIGHT_STD)
    model.eval()
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path
