"""Tokenizers and models for fine-tuning: load (or train) a tokenizer with a chat template, build the model, add LoRA.

Two paths, chosen by ``ModelSpec.name_or_path``:
  * a pretrained model (HF id, local directory, GGUF file, or the embedded SmolLM2 default; `pretrained.model_path`
    resolves them): the model's own tokenizer and weights (safetensors only), with a pad token and a chat template
    added when missing;
  * ``scratch``: a byte-level BPE tokenizer trained on the corpus and a small GPT-2 built from a config (seconds to
    train; the tests use it).

Either way the tokenizer carries the chat template, so the server renders prompts exactly as training did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from chatforge.config import LoraSpec, ModelSpec
from chatforge.train.pretrained import model_path

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
CHATML_TOKENS = (IM_START, IM_END)

# ChatML. The server renders prompts with this same template (saved with the tokenizer), so keep it stable.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_DROPOUT = 0.1  # the scratch model's, when model.dropout is unset

# Config fields that hold a dropout probability, across the architectures we expect (GPT-2, llama, qwen, mistral,
# phi, gpt-neox, ...). Only those a config already has are overridden.
DROPOUT_FIELDS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "embedding_dropout",
    "resid_dropout",
    "dropout",
)

GPT2_LORA_TARGETS = ["c_attn", "c_proj"]
PROJ_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens and the default chat template.

    Byte-level means no unknown tokens: any string round-trips. Training is deterministic for the same texts.
    """
    specials = [ENDOFTEXT, IM_START, IM_END, PAD]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # the full byte alphabet, so text the corpus never showed (emoji, other scripts) still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=PAD,
        extra_special_tokens=list(CHATML_TOKENS),
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(spec: ModelSpec, texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``spec``: the model's own (with pad token and chat template ensured), or one trained on texts.

    A model without a chat template gets ChatML, whose ``<|im_start|>``/``<|im_end|>`` are added as special tokens
    (the model's embeddings then grow in `build_model`).
    """
    if spec.from_scratch:
        if texts is None:
            raise ValueError("model.name_or_path is 'scratch', so a tokenizer is trained: pass the training texts")
        tokenizer = train_tokenizer(texts, spec.vocab_size)
        if spec.chat_template:
            tokenizer.chat_template = spec.chat_template
        return tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(spec.name_or_path))
    if tokenizer.pad_token is None:
        # A dedicated pad token rather than eos: pads are masked out of the loss and of attention, and a separate id
        # keeps "is this padding?" unambiguous for anything downstream that checks ids.
        tokenizer.add_special_tokens({"pad_token": PAD})
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE:
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


# ---------------------------------------------------------------- model


def resolve_dtype(dtype: str, device: torch.device | str | None = None) -> torch.dtype:
    """``ModelSpec.dtype`` or ``EngineSpec.dtype`` as a torch dtype: auto is bf16 on a GPU, fp32 on CPU.

    ``device``: where the model runs (default: a GPU when there is one).
    """
    if dtype == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def stop_token_ids(*ids: int | Sequence[int] | None) -> list[int]:
    """The token ids generation stops at, in order, each once: config values (one id, several, or None) merged."""
    stops: list[int] = []
    for value in ids:
        for token_id in [] if value is None else [value] if isinstance(value, int) else value:
            if token_id not in stops:
                stops.append(token_id)
    return stops


def _set_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Align the model's pad id with the tokenizer's, and make `generate` stop at the end of an assistant turn.

    Stop ids are added to the model's own (llama 3 and qwen list several), never replace them. With ChatML a turn
    ends in <|im_end|>, which is not eos.
    """
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    stops = stop_token_ids(
        model.generation_config.eos_token_id, tokenizer.eos_token_id, tokenizer.get_vocab().get(IM_END)
    )
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


def build_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, torch_dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The causal LM for ``spec``: a small GPT-2 from a config, or a pretrained model (safetensors weights only).

    ``torch_dtype`` defaults to fp32 (the master copy DeepSpeed expects; it casts to bf16 itself when configured).
    """
    dtype = torch_dtype or torch.float32
    if spec.from_scratch:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=spec.max_length,
            n_embd=spec.n_embd,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            resid_pdrop=DEFAULT_DROPOUT if spec.dropout is None else spec.dropout,
            embd_pdrop=DEFAULT_DROPOUT if spec.dropout is None else spec.dropout,
            attn_pdrop=DEFAULT_DROPOUT if spec.dropout is None else spec.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config).to(dtype)
    else:
        path = model_path(spec.name_or_path)
        config = AutoConfig.from_pretrained(path)
        for field in DROPOUT_FIELDS:
            if spec.dropout is not None and isinstance(getattr(config, field, None), float):
                setattr(config, field, spec.dropout)
        # use_safetensors=True refuses pickled (.bin) weights instead of silently unpickling them
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            log.info("resizing token embeddings %d -> %d", model.get_input_embeddings().num_embeddings, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
    _set_token_ids(model, tokenizer)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Keep only each layer's inputs in the forward pass and recompute its activations in backward.

    Non-reentrant checkpointing: it works when the layer inputs need no grad (LoRA's frozen embeddings) and under
    ZeRO-3's parameter hooks; the KV cache is off, as it is useless in training and conflicts with recomputation.
    """
    if not model.supports_gradient_checkpointing:
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing: set train.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


# ---------------------------------------------------------------- LoRA


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The attention projections LoRA adapts by default, found from the model's module names."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "q_proj" in names and "v_proj" in names:  # llama, qwen, mistral, gemma, ...
        return [t for t in PROJ_LORA_TARGETS if t in names]
    if "c_attn" in names:  # GPT-2 style fused qkv
        return [t for t in GPT2_LORA_TARGETS if t in names]
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(f"no default LoRA target modules for model type {model_type!r}: set lora.target_modules")


def apply_lora(model: PreTrainedModel, spec: LoraSpec, trainable_token_ids: Sequence[int] = ()):
    """Wrap ``model`` with LoRA adapters (peft); only the adapters (and ``trainable_token_ids`` rows) train.

    Pass ``trainable_token_ids`` for tokens `load_tokenizer` added to a pretrained model (e.g. the ChatML tokens):
    their embeddings start untrained and would otherwise stay frozen.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(spec.target_modules) if spec.target_modules else default_lora_targets(model)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores weights transposed; peft needs to be told (it warns and guesses otherwise)
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
        trainable_token_indices=list(trainable_token_ids) or None,
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; under ZeRO-3 the full sizes, not this rank's partition."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
