"""Tokenizer training and loading, the chat template, model building (from a config or a local dir), LoRA."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chatforge.config import LoraSpec, ModelSpec
from chatforge.train.model import (
    DEFAULT_CHAT_TEMPLATE,
    apply_lora,
    build_model,
    count_parameters,
    default_lora_targets,
    enable_gradient_checkpointing,
    load_tokenizer,
    resolve_dtype,
    stop_token_ids,
    train_tokenizer,
)
from helpers.corpus import conversation

TINY = {"name_or_path": "scratch", "vocab_size": 400, "n_layer": 2, "n_head": 2, "n_embd": 32, "max_length": 64}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [m["content"] for _ in range(50) for m in conversation(rng, words=(3, 8))]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=400)


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trips_and_is_deterministic(tokenizer, texts):
    assert len(tokenizer) == 400
    assert train_tokenizer(texts, 400).backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    # byte-level: text the corpus never showed still round-trips exactly
    for text in [texts[0], "Ünïcödé, 日本語 and emoji 🙂\ttabs\n\nnewlines  spaces", ""]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.unk_token_id not in tokenizer.encode("日本語 🙂", add_special_tokens=False)


def test_special_tokens_are_atomic(tokenizer):
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]:
        ids = tokenizer.encode(f"before{token}after", add_special_tokens=False)
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == 1
        assert tokenizer.decode(ids) == f"before{token}after"
        assert token in tokenizer.all_special_tokens
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>b", add_special_tokens=False), skip_special_tokens=True) == (
        "ab"
    )


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith(prompt)


def test_load_tokenizer_trains_when_no_model_is_named(texts):
    with pytest.raises(ValueError, match="training texts"):
        load_tokenizer(ModelSpec(**TINY))
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = load_tokenizer(ModelSpec(**TINY, chat_template=custom), texts)
    assert len(tokenizer) == 400 and tokenizer.chat_template == custom


# ---------------------------------------------------------------- model


def test_build_default_gpt2_from_spec(tokenizer):
    spec = ModelSpec(**TINY, dropout=0.2)
    model = build_model(spec, tokenizer)
    config = model.config
    assert config.model_type == "gpt2"
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (2, 2, 32, 64)
    assert config.vocab_size == len(tokenizer)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.2
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    # generation stops at the end of an assistant turn as well as at eos
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert build_model(spec, tokenizer, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], return_dict=False)])
    assert model(input_ids=ids, labels=ids).loss.isfinite()


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(tokenizer, lora):
    """Each layer runs again in backward (that is the memory saving), and the gradients are those of a plain pass,
    also under LoRA, whose frozen embeddings give the checkpointed layers inputs that need no grad."""
    spec = ModelSpec(**TINY, dropout=0.0)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], return_dict=False)])

    def layer_calls_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = build_model(spec, tokenizer)
        if checkpointing:
            enable_gradient_checkpointing(model)
        if lora:
            model = apply_lora(model, LoraSpec(r=2, dropout=0.0))
        model.train()
        calls = []
        for block in model.get_base_model().transformer.h if lora else model.transformer.h:
            block.attn.register_forward_hook(lambda *_: calls.append(1))  # the recompute calls the block's forward
        model(input_ids=ids, labels=ids).loss.backward()
        return len(calls), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_calls, plain_grads = layer_calls_and_grads(False)
    calls, grads = layer_calls_and_grads(True)
    assert (plain_calls, calls) == (TINY["n_layer"], 2 * TINY["n_layer"])
    assert len(grads) == len(plain_grads) > 0
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain)


def test_load_tokenizer_and_model_from_a_local_dir(tokenizer, tmp_path):
    torch.manual_seed(0)
    saved = build_model(ModelSpec(**TINY, dropout=0.0), tokenizer)
    saved.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    spec = ModelSpec(name_or_path=str(tmp_path), max_length=64, dropout=0.3)
    loaded_tokenizer = load_tokenizer(spec)
    assert loaded_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert len(loaded_tokenizer) == len(tokenizer) and loaded_tokenizer.pad_token == "<|pad|>"
    text = "<|im_start|>user\nHello there<|im_end|>\n"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)

    model = build_model(spec, loaded_tokenizer)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.3
    expected = saved.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())

    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(spec.model_copy(update={"chat_template": custom})).chat_template == custom


def test_model_without_template_or_pad_gets_chatml_and_grows(tmp_path):
    # a "base model" tokenizer: only <|endoftext|>, no pad token, no chat template
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["hello world"] * 10, trainer=trainer)
    base = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert base.chat_template is None and base.pad_token is None
    base.save_pretrained(tmp_path)
    build_model(ModelSpec(**{**TINY, "vocab_size": 300}), base).save_pretrained(tmp_path)

    spec = ModelSpec(name_or_path=str(tmp_path), max_length=64)
    tokenizer = load_tokenizer(spec)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.pad_token == "<|pad|>"
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(tokenizer) == len(base) + 3 and {im_start, im_end} <= set(tokenizer.all_special_ids)
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == im_start

    model = build_model(spec, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], return_dict=False)])
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_pickled_weights_are_refused(tokenizer, tmp_path):
    model = build_model(ModelSpec(**TINY), tokenizer)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        build_model(ModelSpec(name_or_path=str(tmp_path), max_length=64), tokenizer)


def test_resolve_dtype():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    # the device a model runs on decides auto (the serving engine's choice); an explicit dtype stays
    assert (
        resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    )
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_stop_token_ids_merge_config_values_in_order_each_once():
    assert stop_token_ids(None, None) == []
    assert stop_token_ids(2, 2, None) == [2]
    assert stop_token_ids([7, 2], 2, 9) == [7, 2, 9]  # a model's own stops first, then the tokenizer's


# ---------------------------------------------------------------- LoRA


def test_lora_on_gpt2_trains_only_adapters(tokenizer):
    model = build_model(ModelSpec(**TINY), tokenizer)
    _, total_before = count_parameters(model)
    assert count_parameters(model) == (total_before, total_before)
    assert default_lora_targets(model) == ["c_attn", "c_proj"]

    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8))
    trainable_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in n for n in trainable_names)
    assert any(".attn.c_attn." in n for n in trainable_names) and any(".attn.c_proj." in n for n in trainable_names)
    trainable, total = count_parameters(peft_model)
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert total == total_before + trainable and trainable < total / 5

    # a step moves only the adapters
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    ids = torch.tensor([tokenizer.encode("hello world, a quiet river", add_special_tokens=False)])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if not p.requires_grad)


def test_lora_targets_per_architecture_and_explicit(tokenizer):
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    assert default_lora_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    wrapped = apply_lora(llama, LoraSpec(r=2))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in wrapped.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}

    explicit = apply_lora(build_model(ModelSpec(**TINY), tokenizer), LoraSpec(r=2, target_modules=["c_fc"]))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in explicit.named_parameters() if p.requires_grad} == {
        "c_fc"
    }
    with pytest.raises(ValueError, match="target_modules"):
        default_lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_lora_can_train_added_token_rows(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = apply_lora(build_model(ModelSpec(**TINY), tokenizer), LoraSpec(r=2), trainable_token_ids=[im_end])
    extra = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra and all("trainable_tokens" in n for n in extra)
