"""Answers to the prompt set and the bias probes, generated and scored on Ray.

Ray Data carries the rows (one per prompt and answer index) to a pool of `GenerationActor`s: each loads the serving
engine (`chatforge.serve.engine.Engine`, continuous batching) and the curation's toxicity scorer once, generates a
batch of answers concurrently, scores them, and marks refusals. The pool holds one actor per ``eval.num_cpus`` CPUs
of the cluster (or ``eval.concurrency``), so the pass scales with the cluster like curation's scoring does.

Every answer is sampled with its own seed, derived from ``eval.seed``, a seed key and the answer's index: a run is
reproducible, and the probes of one bias template share their seeds across groups, so their answers differ by the
demographic term and not by the draw.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Sequence

import pyarrow as pa

from chatforge.config import EvalSpec, ToxicitySpec
from chatforge.eval.metrics import is_refusal
from chatforge.eval.prompts import Probe, Prompt

RESULT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("toxicity", pa.float64()),
        ("refused", pa.bool_()),
        ("error", pa.string()),
        ("prompt_ids", pa.string()),  # JSON list; rows that asked for logprobs only
        ("logprobs", pa.string()),  # JSON [{"token", "logprob", "top": [[token, logprob], ...]}], same rows
    ]
)


def sampling_seed(base: int, key: str, index: int) -> int:
    """A 63-bit seed from the run's seed, a key (prompt id, or bias template id) and the answer's index."""
    digest = hashlib.blake2b(f"{base}/{key}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def build_rows(
    prompts: Sequence[Prompt], probes: Sequence[Probe], spec: EvalSpec, explained: set[str] = frozenset()
) -> list[dict]:
    """One row per prompt (or probe) and answer index: what the actors need, plus what the metrics group by.

    Prompts whose id is in ``explained`` ask for logprobs on their first answer (the explained samples)."""
    rows = []
    items = [(prompt, None) for prompt in prompts] + [(probe.prompt, probe) for probe in probes]
    for prompt, probe in items:
        for index in range(spec.generations_per_prompt):
            rows.append(
                {
                    "row": len(rows),
                    "id": prompt.id,
                    "category": prompt.category,
                    "sample_index": index,
                    "axis": probe.axis if probe else None,
                    "group": probe.group if probe else None,
                    "template": probe.template if probe else None,
                    "messages": json.dumps(prompt.as_messages(spec.system_prompt)),
                    "seed": sampling_seed(spec.seed, probe.template if probe else prompt.id, index),
                    "want_logprobs": index == 0 and prompt.id in explained,
                }
            )
    return rows


class GenerationActor:
    """Holds an engine and a scorer; turns a batch of rows into answers with their toxicity and refusal flag."""

    def __init__(
        self,
        model_dir: str,
        spec: EvalSpec,
        toxicity: ToxicitySpec,
        refusal: str | None,
    ) -> None:
        from chatforge.safety.scorers import build_scorer
        from chatforge.serve.engine import offline_engine

        self.engine = offline_engine(model_dir, spec.engine, spec.num_cpus)
        self.scorer = build_scorer(toxicity)
        self.spec = spec
        self.refusal = refusal

    async def _answer(self, row: dict) -> dict:
        from chatforge.serve.engine import SamplingParams

        spec = self.spec
        try:
            prompt_ids = self.engine.encode_chat(json.loads(row["messages"]))
            params = SamplingParams(
                max_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                seed=row["seed"],
                logprobs=bool(row["want_logprobs"]),
                top_logprobs=spec.top_logprobs if row["want_logprobs"] else 0,
            )
            completion = await self.engine.complete(prompt_ids, params)
        except ValueError as err:  # PromptTooLong, or an empty prompt: this row has no answer, the others go on
            return {"row": row["row"], "error": f"{type(err).__name__}: {err}"}
        result = {
            "row": row["row"],
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }
        if row["want_logprobs"]:
            result["prompt_ids"] = json.dumps(prompt_ids)
            result["logprobs"] = json.dumps(
                [
                    {"token": lp.token, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                    for lp in completion.logprobs
                ]
            )
        return result

    async def _answer_all(self, rows: list[dict]) -> list[dict]:
        return await asyncio.gather(*(self._answer(row) for row in rows))

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = asyncio.run(self._answer_all(batch.to_pylist()))
        answered = [result for result in results if "error" not in result]
        scores = self.scorer.score([result["text"] for result in answered]) if answered else []
        for result, score in zip(answered, scores, strict=True):
            result["toxicity"] = score["toxicity"]
            result["refused"] = is_refusal(result["text"], self.spec.refusal_phrases, self.refusal)
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)


def pool_size(spec: EvalSpec, rows: int, cluster_cpus: float) -> int:
    """Generation actors: ``eval.concurrency``, else one per ``eval.num_cpus`` CPUs; never more than rows."""
    wanted = spec.concurrency or max(1, int(cluster_cpus // spec.num_cpus))
    return max(1, min(wanted, rows))


def generate(
    model_dir: str, rows: list[dict], spec: EvalSpec, toxicity: ToxicitySpec, refusal: str | None
) -> list[dict]:
    """Every row with its answer, toxicity and refusal flag (or its error), in row order. Ray must be initialised."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from chatforge.runtime import cluster_cpus

    if not rows:
        return []
    actors = pool_size(spec, len(rows), cluster_cpus())
    # batches small enough that every actor gets work, large enough for the engine to batch
    batch_size = max(1, min(spec.batch_size, math.ceil(len(rows) / actors)))
    inputs = [{key: row[key] for key in ("row", "messages", "seed", "want_logprobs")} for row in rows]
    answers = (
        ray.data.from_items(inputs, override_num_blocks=math.ceil(len(rows) / batch_size))
        .map_batches(
            GenerationActor,
            fn_constructor_kwargs={"model_dir": model_dir, "spec": spec, "toxicity": toxicity, "refusal": refusal},
            compute=ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus or None,
        )
        .take_all()
    )
    by_row = {answer["row"]: answer for answer in answers}
    if len(by_row) != len(rows):
        raise RuntimeError(f"generation returned {len(by_row)} answers for {len(rows)} prompts")
    return [{**row, **by_row[row["row"]]} for row in rows]
