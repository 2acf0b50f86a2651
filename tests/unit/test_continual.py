"""The continual loop's parts on a real SQLite feedback store: the watermark, conversations, selection, the test."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from chatforge.continual.build import classify, conversation
from chatforge.continual.select import add_disagreement, select
from chatforge.continual.stats import compare_variants, two_proportion_z
from chatforge.continual.uncertainty import answer_nll, final_turn_labels
from chatforge.continual.watermark import CycleConflict, commit_cycle, cycles, open_cycle
from chatforge.serve.feedback import CompletionRecord, FeedbackStore, feedback_query


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}", scrub_pii=False)
    yield s
    s.dispose()


def rate(store: FeedbackStore, n: int, rating: int = 1, variant: str = "prod", start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        prompt = json.dumps([{"role": "user", "content": f"question {i}"}])
        store.record_completion(
            CompletionRecord(f"c{i}", time.time(), variant, None, prompt, f"answer {i}", 1.0, 3, 2, "pass", 0.0, False)
        )
        ids.append(store.record_feedback(f"c{i}", rating, None, None))
    return ids


def rows_in(store: FeedbackStore, cycle) -> list[dict]:
    """The rows `read_feedback` would give the cycle (its SQL, run here without Ray)."""
    query = feedback_query(store.engine.dialect, feedback_ids=(cycle.after_feedback_id, cycle.upto_feedback_id))
    with store.engine.connect() as connection:
        return [dict(row) for row in connection.execute(sa.text(query)).mappings()]


def test_each_feedback_row_goes_to_exactly_one_committed_cycle_even_when_a_cycle_fails_and_reruns(store):
    first_ids = rate(store, 5)
    first = open_cycle(store, settle_s=0)
    assert (first.number, first.after_feedback_id, first.upto_feedback_id) == (1, 0, max(first_ids))
    rate(store, 3, start=5)  # arrives while cycle 1 runs: not cycle 1's
    # cycle 1 fails before committing; the rerun reopens it with the same range, however many rows came since
    again = open_cycle(store, settle_s=0)
    assert again.reopened and (again.after_feedback_id, again.upto_feedback_id) == (0, max(first_ids))
    assert sorted(r["feedback_id"] for r in rows_in(store, again)) == first_ids
    commit_cycle(store, again, {"rows": 5})
    with pytest.raises(CycleConflict):
        commit_cycle(store, again, {"rows": 5})

    second = open_cycle(store, settle_s=0)
    assert second.number == 2 and not second.reopened
    used = [r["feedback_id"] for c in (again, second) for r in rows_in(store, c)]
    assert sorted(used) == list(range(1, 9)) and len(used) == len(set(used))
    commit_cycle(store, second, {"rows": 3})
    assert [c["record"] for c in cycles(store)] == [{"rows": 5}, {"rows": 3}]
    assert open_cycle(store, settle_s=0).empty  # nothing new: an empty cycle


def test_rows_younger_than_the_settle_margin_wait_for_the_next_cycle(store):
    rate(store, 4)
    cycle = open_cycle(store, settle_s=60)
    assert cycle.empty and cycle.upto_feedback_id == 0
    commit_cycle(store, cycle, {})
    later = open_cycle(store, settle_s=60, now=time.time() + 120)
    assert (later.after_feedback_id, later.upto_feedback_id) == (0, 4)


@pytest.mark.parametrize(
    ("rating", "correction", "guard", "expected"),
    [
        (1, None, "pass", ("train", "liked")),
        (-1, "Paris is the capital.", "pass", ("train", "correction")),
        (0, "  ", "pass", ("skip", "neutral")),
        (-1, None, "pass", ("review", "disliked")),
        (1, None, "flagged", ("review", "guarded")),
        (-1, None, "blocked", ("review", "disliked")),
    ],
)
def test_what_a_rated_answer_becomes(rating, correction, guard, expected):
    assert classify(rating, correction, guard) == expected


def test_a_correction_replaces_the_answer_and_keeps_it_in_meta():
    row = {
        "feedback_id": 7,
        "completion_id": "c7",
        "variant": "canary",
        "rating": -1,
        "guard": "pass",
        "prompt": json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]),
        "answer": "Lyon.",
        "correction": "Paris.",
    }
    record = conversation(row)
    assert record["use"] == "train" and record["id"] == "feedback:7"
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][-1]["content"] == "Paris."
    assert json.loads(record["meta"])["answer"] == "Lyon."
    broken = conversation({**row, "prompt": '[{"role": "robot", "content": "x"}]'})
    assert (broken["use"], broken["kind"], broken["messages"]) == ("skip", "bad_prompt", [])


def test_selection_ranks_low_ratings_then_uncertainty_then_disagreement():
    rows = [
        {"id": "a", "prompt": "p1", "variant": "prod", "rating": 1, "uncertainty": 0.5},
        {"id": "b", "prompt": "p2", "variant": "prod", "rating": -1, "uncertainty": 0.1},
        {"id": "c", "prompt": "p3", "variant": "prod", "rating": 1, "uncertainty": 2.5},
        {"id": "d", "prompt": "p1", "variant": "canary", "rating": -1, "uncertainty": 0.1},
        {"id": "e", "prompt": "p4", "variant": "prod", "rating": 1, "uncertainty": 0.5},
    ]
    ranked = add_disagreement(rows)
    assert {r["id"]: r["disagreement"] for r in ranked} == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0, "e": 0.0}
    assert [r["id"] for r in select(ranked, None)] == ["d", "b", "c", "a", "e"]
    assert [r["id"] for r in select(ranked, 2)] == ["d", "b"]


def test_the_z_test_matches_a_hand_computed_value_and_decides_both_ways():
    z, p = two_proportion_z(60, 100, 45, 100)
    assert z == pytest.approx(2.1241, abs=1e-3) and p == pytest.approx(0.03366, abs=1e-4)
    assert compare_variants((60, 100), (45, 100)).decision == "promote"
    assert compare_variants((45, 100), (60, 100)).decision == "rollback"
    assert compare_variants((52, 100), (50, 100)).decision == "wait"
    early = compare_variants((30, 30), (0, 30), min_ratings=100)
    assert early.decision == "wait" and "100 needed" in early.reason
    assert two_proportion_z(10, 10, 20, 20) == (0.0, 1.0)


def test_only_the_final_assistant_turn_is_scored():
    ignore = -100
    labels = [ignore, 5, 6, ignore, ignore, 7, 8, 9, ignore]
    assert final_turn_labels(labels) == [ignore] * 5 + [7, 8, 9, ignore]
    assert final_turn_labels([ignore, ignore]) == [ignore, ignore]


def test_answer_nll_is_the_answers_mean_token_loss_and_scores_only_the_answer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.eval.perplexity import perplexity
    from helpers.tiny_model import save_tiny_model

    path = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    single = [{"role": "user", "content": "how is the weather"}, {"role": "assistant", "content": "sunny and warm"}]
    [score] = answer_nll(model, tokenizer, [single], max_length=64)
    assert score == pytest.approx(perplexity(model, tokenizer, [single], max_length=64).mean_nll, rel=1e-5)
    # an earlier assistant turn is context, not scored: the same final answer after another exchange scores alike
    # only through its context, and a conversation that does not end with the answer gets None
    longer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello friend"}, *single]
    scores = answer_nll(model, tokenizer, [longer, single[:1]], max_length=64)
    assert scores[0] is not None and scores[0] != pytest.approx(
        perplexity(model, tokenizer, [longer], max_length=64).mean_nll, rel=1e-6
    )
    assert scores[1] is None
