"""Input attribution for the explained samples: which prompt tokens each generated token leaned on.

Gradient x input saliency: for generated token t at position p, the gradient of log p(t | tokens before p) with
respect to the input embeddings, times those embeddings, summed over the embedding as an L2 norm per input token.
Each generated token's saliencies over the prompt tokens are normalised to sum to 1; ``prompt_share`` keeps how
much of the total fell on the prompt rather than on the answer's own earlier tokens.

Runs in the driver on a few samples: one forward and one backward per chunk of generated tokens (a chunk is the
sequence repeated once per token, each row's loss on its own token, so one backward gives every row's gradient).

The engine reports generated tokens as text; `recover_ids` maps them back to ids through the tokenizer's vocabulary,
and where several ids decode to the same text it takes the one whose log-probability matches the engine's.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class VocabularyIndex:
    """Token text -> the ids that decode to it (several, for byte fragments that all decode to U+FFFD)."""

    def __init__(self, tokenizer) -> None:
        self._ids: dict[str, list[int]] = defaultdict(list)
        for token_id in range(len(tokenizer)):
            self._ids[tokenizer.decode([token_id])].append(token_id)

    def candidates(self, text: str) -> list[int]:
        return self._ids.get(text, [])


@torch.no_grad()
def recover_ids(model, index: VocabularyIndex, prompt_ids: list[int], tokens: list[dict]) -> list[int] | None:
    """The ids of the engine's generated ``tokens`` ({"token", "logprob"}), or None if one has no vocabulary entry."""
    ids: list[int] = []
    for token in tokens:
        candidates = index.candidates(token["token"])
        if not candidates:
            return None
        if len(candidates) > 1:
            logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            candidates = sorted(candidates, key=lambda i: abs(float(logprobs[i]) - token["logprob"]))
        ids.append(candidates[0])
    return ids


def saliency(model, prompt_ids: list[int], generated_ids: list[int], rows_per_pass: int = 8) -> dict:
    """Gradient x input of every prompt token for each generated token; see the module text.

    Returns ``{"attribution": [[per prompt token] per generated token], "prompt_share": [per generated token]}``."""
    if not prompt_ids or not generated_ids:
        return {"attribution": [], "prompt_share": []}
    ids = torch.tensor(prompt_ids + generated_ids)
    embeddings = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # gradients for the inputs only
        param.requires_grad_(False)
    try:
        with torch.no_grad():
            inputs = embeddings(ids[None]).float()  # [1, length, dim]
        dtype = next(model.parameters()).dtype
        positions = list(range(len(prompt_ids), len(ids)))  # where each generated token sits
        attribution, prompt_share = [], []
        for start in range(0, len(positions), rows_per_pass):
            chunk = positions[start : start + rows_per_pass]
            length = max(chunk)  # the token at p is predicted from positions < p
            rows = inputs[:, :length].repeat(len(chunk), 1, 1).requires_grad_(True)
            logits = model(inputs_embeds=rows.to(dtype)).logits.float()
            targets = torch.stack(
                [torch.log_softmax(logits[row, p - 1], dim=-1)[ids[p]] for row, p in enumerate(chunk)]
            )
            (gradient,) = torch.autograd.grad(targets.sum(), rows)
            scores = (gradient * rows).norm(dim=-1).detach()  # [rows, length]
            for row, p in enumerate(chunk):
                before = scores[row, :p]
                on_prompt = before[: len(prompt_ids)]
                total, prompt_total = float(before.sum()), float(on_prompt.sum())
                normalised = on_prompt / prompt_total if prompt_total > 0 else torch.zeros_like(on_prompt)
                attribution.append([round(float(v), 5) for v in normalised])
                prompt_share.append(round(prompt_total / total, 5) if total > 0 else 0.0)
    finally:
        for param in params:
            param.requires_grad_(True)
    return {"attribution": attribution, "prompt_share": prompt_share}


def explain(model_dir: str, samples: list[dict], max_tokens: int) -> list[dict]:
    """Each sample row (with ``prompt_ids`` and ``logprobs`` from the engine) as the report shows it: prompt tokens,
    generated tokens with their log-probabilities and alternatives, and the attribution of the first ``max_tokens``."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    index = VocabularyIndex(tokenizer)
    explained = []
    for sample in samples:
        base = {
            "id": sample["id"],
            "category": sample["category"],
            "messages": json.loads(sample["messages"]),
            "text": sample.get("text"),
            "finish_reason": sample.get("finish_reason"),
            "toxicity": sample.get("toxicity"),
            "refused": sample.get("refused"),
        }
        if sample.get("error") or not sample.get("logprobs"):
            explained.append({**base, "error": sample.get("error") or "no logprobs returned"})
            continue
        prompt_ids = json.loads(sample["prompt_ids"])
        tokens = json.loads(sample["logprobs"])
        ids = recover_ids(model, index, prompt_ids, tokens)
        result = {
            **base,
            "prompt_tokens": [tokenizer.decode([i]) for i in prompt_ids],
            "tokens": [{**t, "logprob": round(t["logprob"], 5)} for t in tokens],
            "attributed_tokens": 0,
            "attribution": [],
            "prompt_share": [],
        }
        if ids is None:
            result["attribution_error"] = "a generated token is not in the tokenizer's vocabulary"
        else:
            attributed = ids[:max_tokens]
            result.update(saliency(model, prompt_ids, attributed), attributed_tokens=len(attributed))
        explained.append(result)
    return explained
