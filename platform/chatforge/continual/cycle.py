"""One continual-learning cycle (`chatforge loop`): the feedback since the last cycle, to an evaluated candidate.

In order, each phase told to ``progress``, each output under OUTPUT/cycle-NNNN/:
  1. open the cycle (`watermark.open_cycle`): the feedback ids it reads. Nothing new: abandoned, ``no_new_feedback``;
  2. read its rated completions (`read_feedback`, Ray Data) and make each a conversation (`build.conversation`);
  3. score the deployed model's uncertainty of each answer (`uncertainty`, ``loop.uncertainty``), and rank them
     (`select`): review.jsonl is the human-review queue, feedback.jsonl (OpenAI format) the conversations
     that train. Fewer than ``loop.min_train_conversations``: abandoned, ``not_enough_feedback``, so the rows wait;
  4. regenerate the earlier assistant turns of multi-turn training conversations with the deployed model
     (`conditioning`, ``loop.condition_responses``), the final turn kept as the target;
  5. curate the training conversations (as a Ray Dataset; feedback.jsonl holds the same) with the spec's curation
     steps into feedback/ (its datasets are named "feedback");
  6. fine-tune the deployed model on it, mixed with replay data by ``loop.replay_ratio``, into train/;
  7. evaluate the candidate against the deployed model on the replay data's test split, into eval/ (the gate);
  8. with ``loop.canary.dashboard`` set (`canary`): decide on the canary an earlier cycle deployed (promote, roll
     back, or wait on more ratings), then deploy a candidate that passed as the next canary unless one is still
     being compared;
  9. write cycle.json and commit the cycle.
After a promotion, cycles fine-tune from and gate against the promoted model instead of ``loop.deployed_model``.

Any failure after step 1 propagates and leaves the cycle open, so the next run reopens it with the same feedback
ids: no row is used twice or skipped. A reopened cycle starts its directory afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from chatforge.config import Spec, TrainDataSpec
from chatforge.continual.build import SOURCE, USES, conversation
from chatforge.continual.canary import canary_step, promoted_model
from chatforge.continual.select import add_disagreement, select
from chatforge.continual.watermark import Cycle, abandon_cycle, commit_cycle, cycles, open_cycle
from chatforge.files import write_atomic
from chatforge.serve.feedback import FeedbackStore, read_feedback, safe_url

if TYPE_CHECKING:
    from chatforge.tracking import TrackedRun

CYCLE_JSON, REVIEW_JSONL, FEEDBACK_JSONL = "cycle.json", "review.jsonl", "feedback.jsonl"
NO_DEPLOYED_MODEL = (
    "loop.deployed_model is not set: name the served model's dir (chatforge train's OUTPUT/model), which the cycle "
    "fine-tunes from and evaluates against"
)


class LoopInputError(ValueError):
    """A model, data dir or feedback store a cycle cannot use; the message names the key to fix."""


@dataclass(frozen=True)
class CycleResult:
    status: str  # ok | no_new_feedback | not_enough_feedback
    cycle: Cycle
    output: str | None  # OUTPUT/cycle-NNNN; None when the cycle ended before writing anything
    record: dict[str, Any]  # cycle.json (status ok); else what the cycle had counted when it ended


@dataclass(frozen=True)
class LoopInputs:
    deployed_model: str  # a model dir
    replay: list[TrainDataSpec]  # curated data/ dirs, the first holding the eval split


# ---------------------------------------------------------------- inputs


def loop_inputs(spec: Spec) -> LoopInputs:
    """The deployed model and the replay data, checked and resolved; `LoopInputError` names the key to fix."""
    from chatforge.eval.run import EvalInputError, resolve_model_dir
    from chatforge.eval.run import resolve_data_dir as resolve_eval_data
    from chatforge.train.data import TrainDataError, resolve_data_dir

    loop = spec.loop
    if not loop.deployed_model:
        raise LoopInputError(NO_DEPLOYED_MODEL)
    try:
        deployed = resolve_model_dir(loop.deployed_model, "loop.deployed_model")
    except EvalInputError as err:
        raise LoopInputError(str(err)) from None
    key = "loop.replay_data" if loop.replay_data else "train.data"
    sources = [TrainDataSpec(path=path) for path in loop.replay_data] or list(spec.train.data)
    if not sources:
        raise LoopInputError(
            "no replay data: set loop.replay_data (or train.data) to the curated data the deployed model was trained "
            "on; the cycle mixes it in so the model does not forget, and the gate measures perplexity on its test split"
        )
    replay = []
    for number, source in enumerate(sources):
        try:
            path = resolve_data_dir(source.path)
            if number == 0:
                resolve_eval_data(path, spec.eval.split)
        except (TrainDataError, EvalInputError) as err:
            raise LoopInputError(f"{key}[{number}]: {err}") from None
        replay.append(source.model_copy(update={"path": path}))
    return LoopInputs(deployed, replay)


def open_store(spec: Spec) -> FeedbackStore:
    """The feedback store, reached (its tables made if it is new); `LoopInputError` when it cannot be."""
    feedback = spec.serve.feedback
    key = "serve.feedback.url" + (f" (or the env var {feedback.url_env})" if feedback.url_env else "")
    try:
        store = FeedbackStore.from_spec(feedback)
    except (sa.exc.ArgumentError, ImportError) as err:
        raise LoopInputError(f"{key}: cannot use {safe_url(feedback.resolved_url())}: {err}") from None
    try:
        store.prepare()
    except (sa.exc.SQLAlchemyError, OSError) as err:
        store.dispose()
        reason = getattr(err, "orig", None) or err
        raise LoopInputError(f"{key}: cannot reach the feedback store at {safe_url(store.url)}: {reason}") from None
    return store


# ---------------------------------------------------------------- the pieces


def candidate(row: dict[str, Any]) -> dict[str, Any]:
    """A rated completion as its conversation record, with what selection ranks by (rating, variant, prompt)."""
    return {
        **conversation(row),
        "feedback_id": row["feedback_id"],
        "rating": row["rating"],
        "variant": row["variant"],
        "prompt": row["prompt"],
    }


def read_candidates(url: str, cycle: Cycle) -> list[dict[str, Any]]:
    """The cycle's rated completions as candidates, in feedback id order (a cycle's feedback is small)."""
    dataset = read_feedback(url, feedback_ids=(cycle.after_feedback_id, cycle.upto_feedback_id)).map(candidate)
    return sorted((dict(row) for row in dataset.take_all()), key=lambda row: row["feedback_id"])


def scored_conversation(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The prompt and the model's own answer (a correction's row keeps the answer it corrected in ``meta``)."""
    messages = [dict(turn) for turn in row["messages"]]
    if not messages:
        return None
    original = json.loads(row["meta"]).get("answer")
    return messages[:-1] + [{"role": "assistant", "content": original}] if original is not None else messages


def with_uncertainty(rows: list[dict[str, Any]], model_dir: str, max_length: int) -> list[dict[str, Any]]:
    """``rows`` with ``uncertainty``: the deployed model's mean NLL of its answer (`continual.uncertainty`)."""
    from chatforge.continual.uncertainty import add_uncertainty

    scorable = [{**row, "scored_messages": scored_conversation(row)} for row in rows]
    scored = add_uncertainty([r for r in scorable if r["scored_messages"]], model_dir, max_length)
    by_id = {row["feedback_id"]: row["uncertainty"] for row in scored}
    return [{**row, "uncertainty": by_id.get(row["feedback_id"])} for row in rows]


def conditioned(
    rows: list[dict[str, Any]], model_dir: str, spec: Spec, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The training rows with their earlier assistant turns regenerated by the deployed model
    (`continual.conditioning`), and the counts for cycle.json."""
    from chatforge.continual.conditioning import condition_responses, earlier_assistant_turns

    multi = [i for i, row in enumerate(rows) if earlier_assistant_turns(list(row["messages"]))]
    if not multi:
        return rows, {"conversations": 0, "regenerated_turns": 0, "kept_turns": 0, "rounds": 0}
    say(f"regenerating the earlier assistant turns of {len(multi)} conversations with the deployed model")
    result = condition_responses([list(rows[i]["messages"]) for i in multi], model_dir, spec.eval, spec.eval.seed)
    updated = list(rows)
    for i, messages in zip(multi, result.conversations, strict=True):
        updated[i] = {**rows[i], "messages": messages}
    counts = {"regenerated_turns": result.regenerated_turns, "kept_turns": result.kept_turns, "rounds": result.rounds}
    return updated, {"conversations": len(multi), **counts}


def uncertainty_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    values = [row["uncertainty"] for row in rows if row.get("uncertainty") is not None]
    return {
        "scored": len(values),
        "mean_nll": sum(values) / len(values) if values else None,
        "max_nll": max(values) if values else None,
    }


def training_line(row: dict[str, Any]) -> dict[str, Any]:
    """A training conversation as an OpenAI-format line: curation reads id and messages and keeps the rest as meta."""
    return {
        "id": str(row["feedback_id"]),
        "messages": row["messages"],
        "kind": row["kind"],
        "uncertainty": row.get("uncertainty"),
        **json.loads(row["meta"]),
    }


def review_line(row: dict[str, Any]) -> dict[str, Any]:
    """A conversation for the human-review queue: the prompt and the model's answer, why it is there, its origin."""
    return {
        "id": row["id"],
        "kind": row["kind"],
        "disagreement": row["disagreement"],
        "uncertainty": row.get("uncertainty"),
        "messages": row["messages"],
        **json.loads(row["meta"]),
    }


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def training_data(feedback_dir: str, replay: list[TrainDataSpec], replay_ratio: float) -> list[TrainDataSpec]:
    """A cycle's train.data: the curated feedback at weight 1 - ``replay_ratio``, the replay datasets sharing
    ``replay_ratio`` in proportion to their own weights (left out at 0). The trainer mixes datasets by weight, so
    these are the datasets' shares of the training rows."""
    data = [TrainDataSpec(path=feedback_dir, weight=1 - replay_ratio)]
    total = sum(source.weight for source in replay)
    if replay_ratio > 0 and total > 0:
        data += [source.model_copy(update={"weight": replay_ratio * source.weight / total}) for source in replay]
    return data


def feedback_curation_spec(spec: Spec, output: str) -> Spec:
    """The spec with no file source (the feedback comes as a Ray Dataset, `feedback_dataset`) and ``output``."""
    return spec.model_copy(update={"curate": spec.curate.model_copy(update={"sources": [], "output": output})})


def feedback_dataset(lines: list[dict[str, Any]]):
    """feedback.jsonl's lines as the Ray Dataset curation reads (source `build.SOURCE`): its id, messages, and the
    rest of the line as meta, as the file's OpenAI-format reader would make them."""
    import ray.data

    rows = [
        {
            "id": f"{SOURCE}:{line['id']}",
            "messages": line["messages"],
            "meta": json.dumps({k: v for k, v in line.items() if k not in ("id", "messages")}, ensure_ascii=False),
        }
        for line in lines
    ]
    return ray.data.from_items(rows)


def add_empty_val_split(data_dir: str) -> bool:
    """Give curated data an empty val/ when its split step put no conversation there; returns whether it did.

    A cycle's feedback is a few conversations, so the split often puts none in val/, while the trainer wants a val/
    in every dataset. Empty, it adds nothing: the run validates on the replay data's val/."""
    import pyarrow.parquet as pq

    val = os.path.join(data_dir, "val")
    if os.path.isdir(val):
        return False
    first = min(Path(data_dir, "train").rglob("*.parquet"))
    os.makedirs(val)
    pq.write_table(pq.read_schema(first).empty_table(), os.path.join(val, "empty.parquet"))
    return True


def curation_summary(curation) -> dict[str, Any]:
    manifest = curation.manifest
    return {
        "output": curation.output,
        "input_records": manifest["input_records"],
        "kept": manifest["kept"],
        "dropped": manifest["dropped"],
        "splits": manifest["splits"],
        "fingerprint": manifest["fingerprint"],
    }


def training_summary(training, data: list[TrainDataSpec], replay_ratio: float) -> dict[str, Any]:
    final = training.summary["final_metrics"] or {}
    return {
        "output": training.output,
        "model_dir": training.summary["model_dir"],
        "data": [source.model_dump() for source in data],
        "replay_ratio": replay_ratio,
        "steps": final.get("step"),
        "eval_loss": final.get("eval_loss"),
        "eval_loss_by_data": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("eval_loss/")},
        "fingerprint": training.summary["fingerprint"],
    }


def eval_summary(evaluation) -> dict[str, Any]:
    baseline = evaluation.data.get("baseline") or {}
    return {
        "output": evaluation.output_dir,
        "gate": evaluation.data["gate"],
        "perplexity": evaluation.data.get("perplexity"),
        "baseline_perplexity": baseline.get("perplexity"),
    }


# ---------------------------------------------------------------- the cycle


def run_cycle(
    spec: Spec, progress: Callable[[str], None] | None = None, tracked: TrackedRun | None = None
) -> CycleResult:
    """Run one cycle per ``spec.loop``; Ray must already be initialised. ``progress(message)`` hears each phase;
    ``tracked``: the command's MLflow run, which training logs its steps to and the outputs name."""
    from chatforge.data.pipeline import run_curation
    from chatforge.eval.run import run_evaluation
    from chatforge.train.trainer import run_training

    say = progress or (lambda message: None)
    loop = spec.loop
    tracking = tracked.record() if tracked is not None else None
    if not loop.deployed_model:
        raise LoopInputError(NO_DEPLOYED_MODEL)
    store = open_store(spec)
    try:
        say("opening the cycle")
        cycle = open_cycle(store, loop.settle_s)
        record: dict[str, Any] = {
            "cycle": cycle.number,
            "status": "ok",
            "feedback_ids": {"after": cycle.after_feedback_id, "upto": cycle.upto_feedback_id},  # (after, upto]
            "reopened": cycle.reopened,
        }
        if cycle.empty:
            abandon_cycle(store, cycle)
            return CycleResult("no_new_feedback", cycle, None, record | {"status": "no_new_feedback"})
        history = cycles(store)
        promoted = promoted_model(history)
        if promoted:  # the model users are served now
            spec = spec.model_copy(update={"loop": loop.model_copy(update={"deployed_model": promoted})})
            loop = spec.loop
            record["deployed_model_from"] = "promoted canary"
        # Checked once there is feedback to learn from; from here on a failure leaves the cycle open.
        inputs = loop_inputs(spec)

        say(f"reading feedback ids {cycle.after_feedback_id + 1} to {cycle.upto_feedback_id}")
        rows = read_candidates(store.url, cycle)
        if loop.uncertainty:
            say(f"scoring the deployed model's uncertainty of {len(rows)} answers")
            rows = with_uncertainty(rows, inputs.deployed_model, spec.model.max_length)
        uses, kinds = Counter(row["use"] for row in rows), Counter(row["kind"] for row in rows)
        ranked = add_disagreement(rows)
        review = select([row for row in ranked if row["use"] == "review"], loop.review_size)
        train = select([row for row in ranked if row["use"] == "train"], loop.train_size)
        record |= {
            "rows_read": len(rows),
            "uncertainty": uncertainty_summary(rows) if loop.uncertainty else None,
            "uses": {use: uses[use] for use in USES},
            "kinds": dict(sorted(kinds.items())),
        }
        if len(train) < loop.min_train_conversations:
            abandon_cycle(store, cycle)
            return CycleResult("not_enough_feedback", cycle, None, record | {"status": "not_enough_feedback"})

        output = os.path.join(os.path.abspath(loop.output), f"cycle-{cycle.number:04d}")
        shutil.rmtree(output, ignore_errors=True)  # a reopened cycle: nothing of the failed run's is taken for its own
        os.makedirs(output)
        say(f"selecting: {len(review)} conversations to review, {len(train)} to train on")
        if loop.condition_responses:
            train, record["conditioning"] = conditioned(train, inputs.deployed_model, spec, say)
        review_file, feedback_file = os.path.join(output, REVIEW_JSONL), os.path.join(output, FEEDBACK_JSONL)
        write_jsonl(review_file, [review_line(row) for row in review])
        training_lines = [training_line(row) for row in train]
        write_jsonl(feedback_file, training_lines)
        record["selected"] = {
            "review": {"file": review_file, "conversations": len(review)},
            "train": {"file": feedback_file, "conversations": len(train)},
        }

        say(f"curating {len(train)} feedback conversations")
        # curated into feedback/: training names a dataset by its curation dir, so its eval_loss is "feedback"'s
        curation_spec = feedback_curation_spec(spec, os.path.join(output, "feedback"))
        curation = run_curation(curation_spec, tracking=tracking, datasets={SOURCE: feedback_dataset(training_lines)})
        record["curation"] = curation_summary(curation)
        if curation.manifest["splits"].get("train", 0) < loop.min_train_conversations:
            abandon_cycle(store, cycle)
            return CycleResult("not_enough_feedback", cycle, output, record | {"status": "not_enough_feedback"})
        curated_data = os.path.join(curation.output, "data")
        add_empty_val_split(curated_data)

        data = training_data(curated_data, inputs.replay, loop.replay_ratio)
        train_spec = spec.model_copy(
            update={
                "model": spec.model.model_copy(update={"name_or_path": inputs.deployed_model}),
                "train": spec.train.model_copy(
                    update={
                        "output": os.path.join(output, "train"),
                        "data": data,
                        "max_steps": loop.max_steps or spec.train.max_steps,
                    }
                ),
            }
        )

        def on_report(report: dict[str, Any]) -> None:
            loss = f", loss {report['loss']:.3f}" if "loss" in report else ""
            say(f"fine-tuning: step {report.get('step', 0)}/{train_spec.train.max_steps}{loss}")

        training = run_training(
            train_spec, progress=lambda message: say(f"fine-tuning: {message}"), on_report=on_report, tracked=tracked
        )
        record["training"] = training_summary(training, data, loop.replay_ratio)

        evaluation = run_evaluation(
            spec,
            training.summary["model_dir"],
            baseline_dir=inputs.deployed_model,
            data_dir=inputs.replay[0].path,
            output_dir=os.path.join(output, "eval"),
            progress=lambda message: say(f"evaluating: {message}"),
            tracking=tracking,
            baseline_eval=loop.deployed_eval,
        )
        decision = deployment = None
        if loop.canary.dashboard:
            decision, deployment = canary_step(
                loop.canary,
                store.engine,
                history,
                cycle.number,
                bool((evaluation.data["gate"] or {}).get("passed")),
                training.summary["model_dir"],
                say,
            )
        record |= {
            "eval": eval_summary(evaluation),
            "deployed_model": inputs.deployed_model,
            "candidate_model": training.summary["model_dir"],
            "canary": decision,
            "deployment": deployment,
            "tracking": tracking,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        say("writing cycle.json and committing the cycle")
        write_atomic(os.path.join(output, CYCLE_JSON), json.dumps(record, indent=2) + "\n")
        commit_cycle(store, cycle, record)
        return CycleResult("ok", cycle, output, record)
    finally:
        store.dispose()
