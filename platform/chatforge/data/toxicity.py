"""The curation step `toxicity`: score every user and assistant turn, drop toxic assistant turns, keep and flag
toxic user turns.

Two parts, read top to bottom:
  policy   `score_records`, a pure function of a batch of records (unit-tested without Ray), over any `Scorer` of
           `chatforge.safety.scorers` (the one the serving guard and evaluation use too).
  step     `ToxicityStep`: the scoring runs in Ray Data map tasks (each worker process loads the model once and
           keeps it) or on a pool of scorer actors (each loads it once); `toxicity.compute` chooses.

Columns added (`TOXICITY_COLUMNS`):
  toxicity        max "toxicity" over assistant turns (null without an assistant turn, or when already dropped)
  toxicity_user   max "toxicity" over user turns (same nulls)
  toxicity_flag   the record has a toxic turn whose policy is "flag" (False for rows dropped by an earlier step)
  toxicity_turns  JSON: [{"turn": index in messages, "role": ..., "scores": {label: probability}}]

A turn is toxic when its "toxicity" score >= `threshold`. Drop reasons: "toxic_assistant", then "toxic_user".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import pyarrow as pa

from chatforge.config import ToxicitySpec
from chatforge.data.batches import RecordBatchFn, pool_actor_cpus
from chatforge.data.schema import Record, is_kept, mark_dropped
from chatforge.runtime import cluster_cpus
from chatforge.safety.scorers import TOXICITY_LABEL, Scorer, build_scorer

SCORED_ROLES = ("user", "assistant")

TOXICITY_COLUMNS: dict[str, pa.DataType] = {
    "toxicity": pa.float64(),
    "toxicity_user": pa.float64(),
    "toxicity_flag": pa.bool_(),
    "toxicity_turns": pa.string(),
}


# ---------------------------------------------------------------- policy


def score_records(records: list[Record], scorer: Scorer, spec: ToxicitySpec) -> list[Record]:
    """Score the user and assistant turns of the kept records in one scorer call; set the columns; apply policy."""
    if TOXICITY_LABEL not in scorer.labels:
        raise ValueError(f"scorer {type(scorer).__name__} has no {TOXICITY_LABEL!r} label (labels: {scorer.labels})")

    turns: list[tuple[int, int, str]] = []  # (record index, turn index, role), aligned with `texts`
    texts: list[str] = []
    for record_index, record in enumerate(records):
        if not is_kept(record):
            continue
        for turn_index, message in enumerate(record.get("messages") or []):
            if message["role"] in SCORED_ROLES:
                turns.append((record_index, turn_index, message["role"]))
                texts.append(message["content"] or "")

    scores = scorer.score(texts) if texts else []
    if len(scores) != len(texts):
        raise RuntimeError(f"scorer {type(scorer).__name__} returned {len(scores)} results for {len(texts)} texts")

    scored_turns: dict[int, list[dict]] = defaultdict(list)
    for (record_index, turn_index, role), turn_scores in zip(turns, scores, strict=True):
        scored_turns[record_index].append({"turn": turn_index, "role": role, "scores": turn_scores})

    for record_index, record in enumerate(records):
        if is_kept(record):
            _apply_policy(record, scored_turns[record_index], spec)
        else:
            record.update(toxicity=None, toxicity_user=None, toxicity_flag=False, toxicity_turns=None)
    return records


def _apply_policy(record: Record, scored_turns: list[dict], spec: ToxicitySpec) -> None:
    def worst(role: str) -> float | None:
        return max((t["scores"][TOXICITY_LABEL] for t in scored_turns if t["role"] == role), default=None)

    assistant, user = worst("assistant"), worst("user")
    assistant_toxic = assistant is not None and assistant >= spec.threshold
    user_toxic = user is not None and user >= spec.threshold
    record["toxicity"] = assistant
    record["toxicity_user"] = user
    record["toxicity_flag"] = (assistant_toxic and spec.assistant_policy == "flag") or (
        user_toxic and spec.user_policy == "flag"
    )
    record["toxicity_turns"] = json.dumps(scored_turns)
    # A toxic user turn is often what the model must learn to answer well, so it is kept by default; a toxic
    # assistant turn is what the model must never learn to say.
    if assistant_toxic and spec.assistant_policy == "drop":
        mark_dropped(record, "toxic_assistant")
    if user_toxic and spec.user_policy == "drop":
        mark_dropped(record, "toxic_user")


# ---------------------------------------------------------------- step


class ToxicityActor:
    """Loads its scorer once, then scores pyarrow batches: a Ray Data actor, or a worker process's `score_table`."""

    def __init__(self, spec: ToxicitySpec) -> None:
        if spec.backend == "detoxify":
            import torch

            # Ray starts workers with one intra-op thread; match the CPUs the actor reserved instead.
            torch.set_num_threads(max(1, int(spec.num_cpus)))
        scorer = build_scorer(spec)
        self._batch_fn = RecordBatchFn(
            partial(score_records, scorer=scorer, spec=spec), stage="toxicity", adds=TOXICITY_COLUMNS
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        return self._batch_fn(table)


_process_scorers: dict[str, ToxicityActor] = {}  # per worker process: spec (as JSON) -> its loaded scorer


def score_table(table: pa.Table, spec: ToxicitySpec) -> pa.Table:
    """The task form of `ToxicityActor`: a worker process loads the scorer on its first batch and keeps it for every
    batch after, of this run or the next; the table is scored ``spec.batch_size`` rows at a time."""
    key = spec.model_dump_json()
    scorer = _process_scorers.get(key)
    if scorer is None:
        scorer = _process_scorers[key] = ToxicityActor(spec)
    if table.num_rows <= spec.batch_size:
        return scorer(table)
    return pa.concat_tables(
        [scorer(table.slice(start, spec.batch_size)) for start in range(0, table.num_rows, spec.batch_size)]
    )


def uses_tasks(spec: ToxicitySpec) -> bool:
    """Whether scoring runs as map tasks: ``compute``, or for "auto" the backend. The profanity model (alone or
    inside "targeted") is under 1 MB and loads in a fraction of a second: as a task it fuses with the maps around it
    (dedup's staged reads, augment, split, the write), which run on every CPU, and no actor process has to start
    first while the cores wait (docs/benchmarks.md). A detoxify model is a transformer, best loaded once per actor
    (and on its GPU)."""
    return spec.compute == "tasks" or (spec.compute == "auto" and spec.backend != "detoxify")


@dataclass(frozen=True)
class ToxicityStep:
    """The curation step: `score_records` over the dataset, in map tasks or on a pool of scorer actors."""

    spec: ToxicitySpec

    def __call__(self, ds):
        from ray.data import ActorPoolStrategy

        if uses_tasks(self.spec):
            # batch_size None: one call per block. With a row count, Ray Data would bundle the blocks of the map fused
            # before it up to that many rows, e.g. every staged file dedup reads back (one row each) into one task.
            return ds.map_batches(
                partial(score_table, spec=self.spec),
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=self.spec.num_cpus,
                concurrency=self.spec.concurrency,
            )
        total = cluster_cpus()
        low, high = pool_size(self.spec, total)
        cpus = pool_actor_cpus(self.spec.num_cpus, high, total)
        return ds.map_batches(
            ToxicityActor,
            fn_constructor_kwargs={"spec": self.spec},
            compute=ActorPoolStrategy(min_size=low, max_size=high, initial_size=high),
            batch_size=self.spec.batch_size,
            num_cpus=cpus,
            # Ray Data fuses a task map into the actor pool after it when their resources match, and then everything
            # upstream of scoring (dedup's staged-row reads and marks, for one) runs inside the pool's few actors, one
            # batch after another, on one core of two on a 2-CPU Ray. With a remote-args function the pool is never
            # fused, so the maps before it run as parallel tasks beside the scorers.
            ray_remote_args_fn=partial(dict, num_cpus=cpus),
            batch_format="pyarrow",
        )


def pool_size(spec: ToxicitySpec, total: float) -> tuple[int, int]:
    """The pool's smallest and largest size: ``concurrency`` actors when set; else one scorer per ``num_cpus`` CPUs of
    the cluster, all started at once and let go down to one when idle. A single scorer holds back the whole pass on
    more than one CPU, and a pool grown from one on demand starts its next scorer too late to help
    (docs/benchmarks.md). ``total``: the cluster's CPUs."""
    if spec.concurrency:
        return spec.concurrency, spec.concurrency
    return 1, max(1, int(total // spec.num_cpus))
