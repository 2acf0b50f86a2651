"""Held-out perplexity: token-weighted over assistant tokens, equal to what the model's own loss gives per sample."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from chatforge.config import ModelSpec
from chatforge.data.schema import MESSAGE_TYPE
from chatforge.eval.perplexity import model_perplexity, perplexity, read_conversations
from chatforge.train.model import build_model, train_tokenizer
from chatforge.train.tokenize import tokenize_conversation
from helpers.corpus import conversation


@pytest.fixture(scope="module")
def conversations():
    rng = random.Random(3)
    return [conversation(rng, turns=rng.choice([2, 4]), words=(3, 9)) for _ in range(12)]


@pytest.fixture(scope="module")
def model_and_tokenizer(conversations):
    tokenizer = train_tokenizer([m["content"] for c in conversations for m in c], vocab_size=300)
    torch.manual_seed(0)
    spec = ModelSpec(name_or_path="scratch", vocab_size=300, n_layer=2, n_head=2, n_embd=32, max_length=256)
    return build_model(spec, tokenizer).eval(), tokenizer


def test_packed_perplexity_equals_per_sample_model_loss(model_and_tokenizer, conversations):
    model, tokenizer = model_and_tokenizer
    nll, tokens = 0.0, 0
    for messages in conversations:
        sample = tokenize_conversation(messages, tokenizer, 256)
        labels = torch.tensor([sample.labels])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([sample.input_ids]), labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll, tokens = nll + loss * n, tokens + n
    result = perplexity(model, tokenizer, conversations, max_length=256, batch_size=3)
    assert result.tokens == tokens and result.conversations == len(conversations) and result.skipped == 0
    assert result.mean_nll == pytest.approx(nll / tokens, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_conversation_without_assistant_tokens_is_skipped(model_and_tokenizer, conversations):
    model, tokenizer = model_and_tokenizer
    only_user = [{"role": "user", "content": "hello there"}]
    result = perplexity(model, tokenizer, [only_user, conversations[0]], max_length=256)
    assert result.conversations == 1 and result.skipped == 1


def test_model_dir_on_a_curated_split(tmp_path, model_and_tokenizer, conversations):
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "test").mkdir(parents=True)
    table = pa.table({"messages": pa.array(conversations, pa.list_(MESSAGE_TYPE))})
    pq.write_table(table, tmp_path / "data" / "test" / "part.parquet")
    assert len(read_conversations(str(tmp_path / "data"), limit=5)) == 5
    from_dir = model_perplexity(str(tmp_path / "model"), str(tmp_path / "data"), max_length=256)
    assert from_dir.perplexity == pytest.approx(perplexity(model, tokenizer, conversations, 256).perplexity, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="no val/ split"):
        read_conversations(str(tmp_path / "data"), "val")
