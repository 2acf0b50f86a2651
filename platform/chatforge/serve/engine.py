"""Continuous (iteration-level) batching generation for one replica: sequences join and leave at token boundaries.

One background asyncio task runs decode steps, each off the event loop in a thread. A step
  1. drops sequences whose client went away,
  2. feeds every running sequence its last sampled token (one forward over the batch KV cache),
  3. prefills waiting newcomers together (left padded) and merges their cache into the batch cache,
  4. samples a token per row with the row's own parameters, streams the new text, and drops finished rows.
Rows are right-aligned: every row's real tokens end at the last cache column, pads sit on the left and are masked;
position ids count a row's real tokens, so a sequence sees the same positions and keys whether alone or batched.
The task exits when nothing is running or waiting and restarts on the next request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from chatforge.compat import cache_layers
from chatforge.config import EngineSpec
from chatforge.serve.sampling import find_stop, held_back, is_greedy, sample_token, top_alternatives
from chatforge.train.model import resolve_dtype, stop_token_ids

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 (or below sampling.GREEDY_BELOW) = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop sequences (text); the returned text excludes the stop sequence
    seed: int | None = None  # same seed + same prompt + same params -> same text
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]  # top_logprobs alternatives (may be empty)


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk (held back while it may be a stop prefix)
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" on the last chunk, else None
    completion_tokens: int = 0  # tokens generated so far, this chunk's included (the stop token counts)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int  # every token the model generated, the stop token included
    logprobs: tuple[TokenLogprob, ...] = ()


class PromptTooLong(ValueError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the context window is {limit} tokens (prompt + completion), "
            "which leaves no room for an answer: shorten the conversation"
        )
        self.prompt_tokens, self.limit = prompt_tokens, limit


@dataclass(eq=False)
class _Sequence:
    """One request's state; the step thread mutates it, the event loop only reads ``queue`` and sets ``cancelled``."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs not yet attached to a chunk
    done: bool = False
    cancelled: bool = False


class Engine:
    def __init__(self, model_dir: str | Path, spec: EngineSpec, device: str | None = None):
        self.spec = spec
        self.model_name = Path(model_dir).resolve().name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, dtype=resolve_dtype(spec.dtype, self.device)
        )
        self._model.to(self.device).eval()
        config = self._model.config.get_text_config(decoder=True)
        if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=self._model.config).layers):
            raise ValueError(f"{model_dir}: sliding-window or hybrid attention caches are not supported by the engine")
        own_window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        windows = [w for w in (spec.context_window, own_window) if w]  # never beyond the positions the model knows
        if not windows:
            raise ValueError(f"{model_dir}: the model config names no context length: set engine.context_window")
        self.context_window = min(windows)
        # transformers 5.x renames forward's `past_key_values` to `cache` (the old name warns, then goes in 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(self._model.forward).parameters else "past_key_values"
        self._stop_ids = frozenset(
            stop_token_ids(self._model.generation_config.eos_token_id, self._tokenizer.eos_token_id)
        )
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0

        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of the cache and mask is _running[i]
        self._admitting: list[_Sequence] = []  # taken from _waiting by the current step, not yet in _running
        self._next_tokens: list[int] = []  # per row: the token sampled last step, not yet in the cache
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token
        self._task: asyncio.Task | None = None
        self._steps = self._rows_stepped = self._max_batch = self._tokens = 0

    # ---------------------------------------------------------------- public API

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a conversation, rendered with the model's chat template (control tokens in text stay text)."""
        return list(
            self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
            )
        )

    def check(self, prompt_ids: list[int], max_tokens: int) -> int:
        """The max_tokens the window leaves room for; PromptTooLong when it leaves none."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_window:
            raise PromptTooLong(len(prompt_ids), self.context_window)
        return min(max_tokens, self.context_window - len(prompt_ids))

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Chunks of the answer as they are generated; closing the iterator early removes the sequence."""
        seq = self._submit(prompt_ids, params)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        seq = self._submit(prompt_ids, params)
        texts, logprobs = [], []
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                texts.append(item.text)
                logprobs.extend(item.logprobs)
                if item.finish_reason is not None:
                    break
        finally:
            seq.cancelled = True
        return Completion(
            text="".join(texts),
            finish_reason=item.finish_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(seq.generated),
            logprobs=tuple(logprobs),
        )

    def stats(self) -> dict:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "steps": self._steps,
            "mean_batch": self._rows_stepped / self._steps if self._steps else 0.0,
            "max_batch": self._max_batch,
            "tokens": self._tokens,  # every token sampled, for every sequence, since the engine started
        }

    # ---------------------------------------------------------------- scheduling (event loop)

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> _Sequence:
        max_new = self.check(prompt_ids, params.max_tokens)
        generator = None
        if not is_greedy(params.temperature):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "big") >> 1)
        seq = _Sequence(list(prompt_ids), params, max_new, generator)
        self._waiting.append(seq)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return seq

    async def _run(self) -> None:
        try:
            while self._waiting or self._running:
                events: list[tuple[_Sequence, Chunk | BaseException]] = []
                try:
                    await asyncio.to_thread(self._step, events)
                except Exception as error:  # a bug outside the guarded phases: fail the batch, keep serving
                    log.exception("generation step failed")
                    batch = dict.fromkeys(self._running + self._admitting)  # a failed merge may have put rows in both
                    events += [(seq, error) for seq in batch if not seq.done]
                    self._reset()
                for seq, item in events:
                    seq.queue.put_nowait(item)
        finally:
            self._task = None

    # ---------------------------------------------------------------- one step (worker thread)

    @torch.inference_mode()
    def _step(self, events: list[tuple[_Sequence, Chunk | BaseException]]) -> None:
        """One decode step; appends what each sequence gets (a chunk or its error) to ``events``."""
        self._keep([i for i, seq in enumerate(self._running) if not seq.cancelled])
        size = len(self._running)
        if self._running:
            rows = list(self._running)
            try:
                logits = self._decode()
            except Exception as error:
                log.exception("decode step failed for %d sequences", len(rows))
                events += [(seq, error) for seq in rows]
                self._reset()
            else:
                self._advance(rows, logits, events)
                self._keep([i for i, seq in enumerate(self._running) if not seq.done])

        newcomers = self._admitting = []
        while self._waiting and len(self._running) + len(newcomers) < self.spec.max_batch_size:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                newcomers.append(seq)
        if newcomers:
            try:
                logits, cache, mask = self._prefill(newcomers)
            except Exception as error:
                log.exception("prefill failed for %d sequences", len(newcomers))
                events += [(seq, error) for seq in newcomers]
            else:
                self._merge(newcomers, cache, mask)
                size = len(self._running)
                self._advance(newcomers, logits, events)
                self._keep([i for i, seq in enumerate(self._running) if not seq.done])
        self._admitting = []

        self._steps += size > 0
        self._rows_stepped += size  # sequences in the batch this step (the running ones plus those that joined)
        self._max_batch = max(self._max_batch, size)

    def _decode(self) -> torch.Tensor:
        """One forward of every running row's pending token; the last-position logits, fp32 [rows, vocab]."""
        tokens = torch.tensor([[t] for t in self._next_tokens], device=self.device)
        mask = F.pad(self._mask, (0, 1), value=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        out = self._model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self._cache},
        )
        self._mask = mask
        return out.logits[:, -1].float()

    def _prefill(self, rows: list[_Sequence]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Forward the newcomers' prompts together, left padded; their logits, cache and mask."""
        length = max(len(seq.prompt_ids) for seq in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, seq in enumerate(rows):
            ids[i, length - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[i, length - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1].float(), cache, mask

    def _merge(self, rows: list[_Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch: left pad the shorter cache along the sequence, concatenate rows."""
        if not self._running:
            self._cache, self._mask = cache, mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(cache_layers(self._cache), cache_layers(cache), strict=True):
                old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
                old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
            self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
        self._running += rows
        self._next_tokens += [0] * len(rows)  # set by _advance

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch, and cut cache columns that became padding in every row."""
        if len(rows) == len(self._running):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._running = [self._running[i] for i in rows]
        self._next_tokens = [self._next_tokens[i] for i in rows]
        first = int(self._mask.any(dim=0).long().argmax())
        if first:
            self._mask = self._mask[:, first:]
            for layer in cache_layers(self._cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _reset(self) -> None:
        self._running, self._admitting, self._next_tokens, self._cache, self._mask = [], [], [], None, None

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor, events: list) -> None:
        """Sample each row's next token and queue the text it releases; a failing row fails alone."""
        offset = len(self._running) - len(rows)  # rows are the last ones of the batch
        for i, seq in enumerate(rows):
            try:
                token = sample_token(logits[i], seq.params.temperature, seq.params.top_p, seq.generator)
                self._tokens += 1
                self._next_tokens[offset + i] = token
                seq.generated.append(token)
                if seq.params.logprobs:
                    seq.pending.append(self._logprob(logits[i], token, seq.params.top_logprobs))
                chunk = self._text(seq, token)
            except Exception as error:
                log.exception("sampling failed")
                seq.done = True
                events.append((seq, error))
                continue
            if chunk is not None:
                events.append((seq, chunk))

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, dim=-1)
        alternatives = tuple((self._tokenizer.decode([t]), lp) for t, lp in top_alternatives(logprobs, top))
        return TokenLogprob(self._tokenizer.decode([token]), float(logprobs[token]), alternatives)

    def _text(self, seq: _Sequence, token: int) -> Chunk | None:
        """The chunk this token releases (None when all of it must wait), deciding whether the sequence is done."""
        finish = None
        ids = seq.generated
        if token in self._stop_ids:
            finish, ids = "stop", ids[:-1]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        cut = find_stop(text, seq.params.stop)
        if cut is not None:
            finish, text = "stop", text[:cut]
        if finish is None and len(seq.generated) >= seq.max_new:
            finish = "length"
        if finish is None:
            text = text[: len(text) - held_back(text, seq.params.stop)]
        new = text[seq.sent :]
        seq.sent = max(seq.sent, len(text))
        if not new and finish is None:
            return None
        chunk = Chunk(new, tuple(seq.pending), finish, len(seq.generated))
        seq.pending.clear()
        seq.done = finish is not None
        return chunk


def offline_engine(model_dir: str | Path, spec: EngineSpec, num_cpus: float) -> Engine:
    """The engine for a Ray actor or Serve replica that reserved ``num_cpus`` CPUs (a serving replica; batch
    inference: eval, conditioning). Ray starts workers with one torch thread; unless ``spec.torch_threads`` says
    otherwise, the engine uses the whole CPUs reserved (at least one)."""
    if spec.torch_threads is None:
        spec = spec.model_copy(update={"torch_threads": max(1, int(num_cpus))})
    return Engine(model_dir, spec)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a [rows, seq] mask or a [rows, heads, seq, dim] cache tensor on the left to ``length`` positions."""
    missing = length - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[-2])
    if not missing:
        return tensor
    return F.pad(tensor, (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0))
