"""Toxicity: score every user and assistant turn, drop toxic assistant turns, keep and flag toxic user turns.

Three parts, read top to bottom:
  scorers  `Scorer` is what curation, evaluation and the server's guard share: texts in, one dict of
           label -> probability per text out, always with the label "toxicity". The offline default, "targeted"
           (`chatforge.safety.targeted.TargetedScorer`), counts `ProfanityScorer`'s words (the model shipped inside
           the alt-profanity-check package) where they are aimed at the addressee, and adds slurs, threats and
           wishes of harm; `DetoxifyScorer` is production.
  policy   `score_records`, a pure function of a batch of records (unit-tested without Ray).
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

import io
import json
import logging
import pickle
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import pyarrow as pa

from chatforge.config import ToxicitySpec
from chatforge.data.schema import Record, RecordBatchFn, is_kept, mark_dropped
from chatforge.runtime import cluster_cpus

logger = logging.getLogger(__name__)

TOXICITY_LABEL = "toxicity"
SCORED_ROLES = ("user", "assistant")

TOXICITY_COLUMNS: dict[str, pa.DataType] = {
    "toxicity": pa.float64(),
    "toxicity_user": pa.float64(),
    "toxicity_flag": pa.bool_(),
    "toxicity_turns": pa.string(),
}


# ---------------------------------------------------------------- scorers


@runtime_checkable
class Scorer(Protocol):
    """Texts in, one {label: probability} per text out, in order; the labels include "toxicity"."""

    labels: tuple[str, ...]

    def score(self, texts: list[str]) -> list[dict[str, float]]: ...


class ProfanityScorer:
    """alt-profanity-check's TF-IDF + calibrated linear model, shipped inside its wheel: backend "profanity", and the
    judge of words inside the default "targeted" backend.

    A bag of words: it knows profanity and insults, not who they are aimed at ("that sucks" scores like "you suck")
    nor threats without rude words; use detoxify for production data. The model is read from the package's files
    without scikit-learn (`profanity_model`: the same scores, without scikit-learn's import in every process that
    scores); a package whose model is of another kind is used through its own `predict_prob`.
    """

    labels = (TOXICITY_LABEL,)

    def __init__(self) -> None:
        from chatforge.data.profanity_model import UnsupportedModel, load_linear_model

        try:
            self._predict_prob = load_linear_model().predict_prob
        except UnsupportedModel as why:
            logger.warning("alt-profanity-check's model is read through scikit-learn (%s)", why)
            self._predict_prob = _package_predict_prob()
        rude, polite = self._predict_prob(["you are a fucking idiot", "thank you, have a nice day"])
        if not rude > 0.5 > polite:
            raise RuntimeError(
                "alt-profanity-check's model does not score as it should "
                f"(insult {rude:.2f}, polite {polite:.2f}); reinstall the package (pip install alt-profanity-check)"
            )

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [{TOXICITY_LABEL: float(p)} for p in self._predict_prob(texts)]


def _package_predict_prob():
    """alt-profanity-check's own `predict_prob` (imports scikit-learn; the package unpickles its model then)."""
    from sklearn.exceptions import InconsistentVersionWarning

    # A scikit-learn newer than the one that pickled the model warns on every worker. The warning alone proves
    # nothing either way, so silence it; the caller checks the model's answers.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        from profanity_check import predict_prob
    return predict_prob


class DetoxifyScorer:
    """The production backend: `detoxify.Detoxify`, labels toxicity, severe_toxicity, obscene, threat, insult, ...

    ``checkpoint`` is a local checkpoint file (offline; ``huggingface_config_path`` or the checkpoint's own
    ``arch.args.model_type`` must then be a local dir with the HF config and tokenizer) or a published name
    ("original", "unbiased", "multilingual", ...), which detoxify downloads from its GitHub releases.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        huggingface_config_path: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        checkpoint = checkpoint or "original"
        if checkpoint in MODEL_URLS:
            # detoxify fetches these with torch.hub and weights_only=False: trusted as detoxify's own releases.
            self.model = Detoxify(model_type=checkpoint, device=device, huggingface_config_path=huggingface_config_path)
        elif Path(checkpoint).is_file():
            self.model = Detoxify(
                checkpoint=_safe_checkpoint(checkpoint), device=device, huggingface_config_path=huggingface_config_path
            )
        else:
            raise FileNotFoundError(
                f"toxicity.checkpoint {checkpoint!r} is neither a file nor a published detoxify model "
                f"({', '.join(MODEL_URLS)}); give a local checkpoint path or one of those names"
            )
        self.labels = tuple(self.model.class_names)
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        # Forward passes over texts of similar length, so short turns are not padded to the longest of the batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict[str, float]] = [{} for _ in texts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            predicted = self.model.predict([texts[i] for i in chunk])
            for label, values in predicted.items():
                # detoxify squeezes a one-text batch to a bare float
                values = values if isinstance(values, list) else [values]
                for index, value in zip(chunk, values, strict=True):
                    results[index][label] = float(value)
        return results


def _safe_checkpoint(path: str) -> io.BytesIO:
    """The checkpoint's bytes, after proving they unpickle with ``weights_only=True``.

    detoxify 0.5.4 calls ``torch.load(checkpoint, weights_only=False)`` with no way to change it, and an
    unrestricted unpickle can run arbitrary code. Its format is plain data (dicts, lists, strings, tensors), so we
    first load the bytes with the restricted unpickler, then hand detoxify the same in-memory bytes: the file cannot
    change between the check and the load. Costs one extra transient copy of the checkpoint in memory.
    """
    import torch

    buffer = io.BytesIO(Path(path).read_bytes())
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: this checkpoint holds pickled objects besides tensors and plain data, which could run code "
            "when loaded; re-save it from a trusted environment as torch.save({'config': <plain dict>, "
            f"'state_dict': <tensors>}}, path).\n{err}"
        ) from None
    except Exception as err:
        raise ValueError(f"{path}: not a torch checkpoint detoxify can read: {err}") from err
    buffer.seek(0)
    return buffer


def build_scorer(spec: ToxicitySpec) -> Scorer:
    """The scorer a spec names, with its model loaded."""
    if spec.backend == "detoxify":
        return DetoxifyScorer(spec.checkpoint, spec.huggingface_config_path, spec.device)
    if spec.backend == "targeted":
        from chatforge.safety.targeted import TargetedScorer

        return TargetedScorer(ProfanityScorer())
    return ProfanityScorer()


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
    inside "targeted") is a few MB and loads in a fraction of a second: as a task it fuses with the maps around it
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
        cpus = actor_cpus(self.spec, high, total)
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


def actor_cpus(spec: ToxicitySpec, actors: int, total: float) -> float:
    """CPUs each scorer actor reserves, leaving two CPUs of the cluster to the tasks around the pool.

    The pool's actors hold their CPUs for the whole run: if they took every CPU, the shuffles and maps upstream could
    never be scheduled and the pipeline would wait forever (seen on a 1-CPU Ray). With one CPU left, the map
    feeding the pool and the one draining it take turns on it; with two, both run. Reserving less only changes
    scheduling; the actors still use the cores the OS gives them. ``total``: the cluster's CPUs.
    """
    room = max(total - 2.0, 0.0) / actors
    return min(spec.num_cpus, room)
