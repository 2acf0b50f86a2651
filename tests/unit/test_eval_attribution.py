"""Gradient x input attribution on a tiny GPT-2: the batched pass equals a token-by-token computation, rows are
normalised, and the engine's token texts map back to the ids it generated."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chatforge.config import EngineSpec
from chatforge.eval.attribution import VocabularyIndex, recover_ids, saliency
from chatforge.serve.engine import Engine, SamplingParams
from helpers.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("tiny"), n_positions=128)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def reference(model, prompt_ids, generated_ids):
    """One backward per generated token, written the plain way."""
    ids = torch.tensor(prompt_ids + generated_ids)
    rows, shares = [], []
    for offset in range(len(generated_ids)):
        p = len(prompt_ids) + offset
        embeds = model.get_input_embeddings()(ids[None, :p]).detach().requires_grad_(True)
        logprob = torch.log_softmax(model(inputs_embeds=embeds).logits[0, -1], dim=-1)[ids[p]]
        logprob.backward()
        scores = (embeds.grad * embeds).norm(dim=-1)[0].detach()
        on_prompt = scores[: len(prompt_ids)]
        rows.append((on_prompt / on_prompt.sum()).tolist())
        shares.append(float(on_prompt.sum() / scores.sum()))
    return rows, shares


def test_batched_saliency_equals_token_by_token(tiny):
    _, model, tokenizer = tiny
    prompt_ids = tokenizer("the quiet river likes music")["input_ids"]
    generated_ids = tokenizer(" and a small bright garden")["input_ids"]
    result = saliency(model, prompt_ids, generated_ids, rows_per_pass=3)  # chunks of 3 with a remainder
    rows, shares = reference(model, prompt_ids, generated_ids)
    assert len(result["attribution"]) == len(generated_ids)
    for got, want in zip(result["attribution"], rows, strict=True):
        assert len(got) == len(prompt_ids) and sum(got) == pytest.approx(1.0, abs=1e-3)
        assert got == pytest.approx(want, abs=1e-4)
    assert result["prompt_share"] == pytest.approx(shares, abs=1e-4)
    assert result["prompt_share"][0] == pytest.approx(1.0)  # the first token has only the prompt to lean on
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_saliency_of_nothing():
    assert saliency(None, [], [1]) == {"attribution": [], "prompt_share": []}


def test_engine_tokens_map_back_to_the_generated_ids(tiny):
    path, model, tokenizer = tiny
    engine = Engine(path, EngineSpec(max_batch_size=2), device="cpu")
    prompt_ids = engine.encode_chat([{"role": "user", "content": "hello there friend"}])
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, logprobs=True, top_logprobs=3)
    completion = asyncio.run(engine.complete(prompt_ids, params))
    tokens = [{"token": lp.token, "logprob": lp.logprob} for lp in completion.logprobs]
    ids = recover_ids(model, VocabularyIndex(tokenizer), prompt_ids, tokens)
    assert ids is not None and len(ids) == completion.completion_tokens
    assert [tokenizer.decode([i]) for i in ids] == [t["token"] for t in tokens]
    # the recovered ids are the ones the engine scored: teacher forcing gives its logprobs back
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    forced = [float(logprobs[i, token]) for i, token in enumerate(ids)]
    assert forced == pytest.approx([t["logprob"] for t in tokens], abs=1e-3)


def test_ambiguous_token_text_is_resolved_by_logprob(tiny):
    _, model, tokenizer = tiny
    index = VocabularyIndex(tokenizer)
    prompt_ids = tokenizer("the river")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1], dim=-1)
    # byte fragments all decode to U+FFFD: pick two of them and ask for the one with this logprob
    fragments = index.candidates("\ufffd")
    assert len(fragments) > 1
    target = fragments[-1]
    assert recover_ids(model, index, prompt_ids, [{"token": "\ufffd", "logprob": float(logprobs[target])}]) == [target]
    assert recover_ids(model, index, prompt_ids, [{"token": "not-a-token-text", "logprob": 0.0}]) is None
