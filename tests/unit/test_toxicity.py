"""Toxicity: the real scorers (profanity model, detoxify on a tiny checkpoint) and the drop/flag policy."""

from __future__ import annotations

import json
import os

import pytest
import torch

from chatforge.config import ToxicitySpec
from chatforge.data.toxicity import TOXICITY_COLUMNS, score_records
from chatforge.safety.scorers import DetoxifyScorer, ProfanityScorer, Scorer, build_scorer
from helpers.tiny_detoxify import build_tiny_detoxify

INSULT = "you are a fucking idiot, shut up"
POLITE = "thank you so much, that was very helpful"


# ---------------------------------------------------------------- a fixed-score double for the policy logic


class FixedScorer:
    """Scores a text by lookup (0.0 when unknown) and records each call, to test the policy alone."""

    labels = ("toxicity", "insult")

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls: list[list[str]] = []

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        self.calls.append(list(texts))
        return [{"toxicity": self.scores.get(t, 0.0), "insult": self.scores.get(t, 0.0) / 2} for t in texts]


def conversation(record_id: str, *turns: tuple[str, str], drop_reason: str | None = None) -> dict:
    return {
        "id": record_id,
        "source": "test",
        "messages": [{"role": role, "content": content} for role, content in turns],
        "meta": "{}",
        "raw": None,
        "drop_reason": drop_reason,
    }


TOXIC = "toxic words"
SCORES = {TOXIC: 0.9, "meh": 0.3}


def test_toxic_assistant_turn_drops_the_record():
    record = conversation("a", ("user", "hi"), ("assistant", TOXIC), ("user", "ok"), ("assistant", "meh"))
    [out] = score_records([record], FixedScorer(SCORES), ToxicitySpec())
    assert out["drop_reason"] == "toxic_assistant"
    assert out["toxicity"] == pytest.approx(0.9)
    assert out["toxicity_user"] == pytest.approx(0.0)
    assert out["toxicity_flag"] is False
    turns = json.loads(out["toxicity_turns"])
    assert [(t["turn"], t["role"]) for t in turns] == [(0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    assert turns[1]["scores"] == {"toxicity": 0.9, "insult": 0.45}


def test_assistant_flag_policy_keeps_and_flags():
    record = conversation("a", ("user", "hi"), ("assistant", TOXIC))
    [out] = score_records([record], FixedScorer(SCORES), ToxicitySpec(assistant_policy="flag"))
    assert out["drop_reason"] is None
    assert out["toxicity_flag"] is True


def test_toxic_user_turn_is_kept_and_flagged():
    record = conversation("u", ("system", TOXIC), ("user", TOXIC), ("assistant", "I won't answer that."))
    [out] = score_records([record], FixedScorer(SCORES), ToxicitySpec())
    assert out["drop_reason"] is None
    assert out["toxicity_flag"] is True
    assert out["toxicity_user"] == pytest.approx(0.9)
    assert out["toxicity"] == pytest.approx(0.0)
    # the system prompt is not a turn anyone said in the conversation: not scored
    assert [t["role"] for t in json.loads(out["toxicity_turns"])] == ["user", "assistant"]


def test_user_policy_drop_and_ignore():
    record = conversation("u", ("user", TOXIC), ("assistant", "fine"))
    [dropped] = score_records([dict(record)], FixedScorer(SCORES), ToxicitySpec(user_policy="drop"))
    assert dropped["drop_reason"] == "toxic_user"
    [ignored] = score_records([dict(record)], FixedScorer(SCORES), ToxicitySpec(user_policy="ignore"))
    assert ignored["drop_reason"] is None
    assert ignored["toxicity_flag"] is False
    assert ignored["toxicity_user"] == pytest.approx(0.9)


def test_threshold_is_inclusive_and_configurable():
    record = conversation("m", ("user", "hi"), ("assistant", "meh"))
    [kept] = score_records([dict(record)], FixedScorer(SCORES), ToxicitySpec(threshold=0.31))
    assert kept["drop_reason"] is None
    [dropped] = score_records([dict(record)], FixedScorer(SCORES), ToxicitySpec(threshold=0.3))
    assert dropped["drop_reason"] == "toxic_assistant"


def test_first_drop_reason_wins_and_dropped_rows_pass_through():
    earlier = conversation("d", ("user", TOXIC), ("assistant", TOXIC), drop_reason="dedup")
    both = conversation("b", ("user", TOXIC), ("assistant", TOXIC))
    scorer = FixedScorer(SCORES)
    out = score_records([earlier, both], scorer, ToxicitySpec(user_policy="drop"))
    assert out[0]["drop_reason"] == "dedup"
    assert out[0]["toxicity"] is None and out[0]["toxicity_user"] is None
    assert out[0]["toxicity_flag"] is False and out[0]["toxicity_turns"] is None
    assert out[1]["drop_reason"] == "toxic_assistant"
    # the already-dropped row's turns were never sent to the scorer
    assert scorer.calls == [[TOXIC, TOXIC]]


def test_one_scorer_call_per_batch_and_order_kept():
    records = [conversation(str(i), ("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(5)]
    records.append(conversation("no-assistant", ("user", "alone")))
    scorer = FixedScorer({"a3": 0.8})
    out = score_records(records, scorer, ToxicitySpec())
    assert len(scorer.calls) == 1
    assert scorer.calls[0] == [t for i in range(5) for t in (f"q{i}", f"a{i}")] + ["alone"]
    assert [r["id"] for r in out] == ["0", "1", "2", "3", "4", "no-assistant"]
    assert [r["drop_reason"] for r in out] == [None, None, None, "toxic_assistant", None, None]
    assert out[-1]["toxicity"] is None and out[-1]["toxicity_user"] == 0.0
    assert set(TOXICITY_COLUMNS) <= set(out[0])


def test_batch_with_nothing_to_score_makes_no_call():
    scorer = FixedScorer({})
    out = score_records([conversation("d", ("user", "x"), drop_reason="malformed:json")], scorer, ToxicitySpec())
    assert scorer.calls == []
    assert out[0]["toxicity_flag"] is False


def test_scorer_without_toxicity_label_is_refused():
    class NoToxicity(FixedScorer):
        labels = ("insult",)

    with pytest.raises(ValueError, match="no 'toxicity' label"):
        score_records([conversation("a", ("user", "x"))], NoToxicity({}), ToxicitySpec())


# ---------------------------------------------------------------- the offline profanity model


def test_profanity_scorer_orders_insult_above_polite():
    scorer = build_scorer(ToxicitySpec(backend="profanity"))
    assert isinstance(scorer, ProfanityScorer) and isinstance(scorer, Scorer)
    insult, polite = scorer.score([INSULT, POLITE])
    assert insult["toxicity"] > 0.5 > polite["toxicity"]
    assert insult["toxicity"] > polite["toxicity"]
    assert scorer.score([]) == []


def test_profanity_scorer_through_the_policy():
    records = [
        conversation("rude", ("user", "hi"), ("assistant", INSULT)),
        conversation("nice", ("user", INSULT), ("assistant", POLITE)),
    ]
    rude, nice = score_records(records, ProfanityScorer(), ToxicitySpec())
    assert rude["drop_reason"] == "toxic_assistant"
    assert nice["drop_reason"] is None and nice["toxicity_flag"] is True


# ---------------------------------------------------------------- detoxify, offline, on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    return build_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


def test_detoxify_scorer_orders_toxic_above_clean(tiny_detoxify):
    checkpoint, config_dir = tiny_detoxify
    scorer = build_scorer(
        ToxicitySpec(backend="detoxify", checkpoint=str(checkpoint), huggingface_config_path=str(config_dir))
    )
    assert isinstance(scorer, DetoxifyScorer)
    # detoxify's "toxic" class comes back under our common label
    assert scorer.labels == ("toxicity", "insult")
    toxic, clean = scorer.score(["shut up you stupid moron", "thank you , have a lovely day"])
    assert toxic["toxicity"] > 0.5 > clean["toxicity"]
    assert set(toxic) == {"toxicity", "insult"}


def test_detoxify_scorer_batches_keep_input_order(tiny_detoxify):
    checkpoint, config_dir = tiny_detoxify
    scorer = DetoxifyScorer(str(checkpoint), str(config_dir), batch_size=2)
    texts = ["you idiot", "have a nice day", "i like reading books in the garden", "worthless moron", "hello " * 300]
    batched = scorer.score(texts)
    one_by_one = [scorer.score([t])[0] for t in texts]  # a one-text batch: detoxify returns bare floats
    for together, alone in zip(batched, one_by_one, strict=True):
        assert together == pytest.approx(alone, abs=1e-4)
    assert batched[0]["toxicity"] > batched[1]["toxicity"]


class _Payload:
    """Pickles as a call to open(marker, "w"): unpickling it with weights_only=False creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_detoxify_refuses_a_checkpoint_that_would_run_code(tiny_detoxify, tmp_path):
    checkpoint, config_dir = tiny_detoxify
    loaded = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code-ran"
    loaded["config"]["payload"] = _Payload(str(marker))
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(loaded, unsafe)
    with pytest.raises(ValueError, match="could run code"):
        DetoxifyScorer(str(unsafe), str(config_dir))
    assert not os.path.exists(marker)


def test_detoxify_unknown_checkpoint_names_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a published detoxify model.*original"):
        DetoxifyScorer(str(tmp_path / "missing.ckpt"))


def test_score_table_loads_the_scorer_once_per_process_and_scores_in_batches(monkeypatch):
    from chatforge.data import toxicity
    from chatforge.data.batches import records_to_table
    from chatforge.data.schema import BASE_SCHEMA

    scorer = FixedScorer(SCORES)
    builds = []
    monkeypatch.setattr(toxicity, "_process_scorers", {})
    monkeypatch.setattr(toxicity, "build_scorer", lambda spec: builds.append(spec) or scorer)
    spec = ToxicitySpec(batch_size=3)
    records = [conversation(f"r{i}", ("user", f"q{i}"), ("assistant", TOXIC if i == 4 else "meh")) for i in range(7)]
    table = records_to_table(records, BASE_SCHEMA)

    first = toxicity.score_table(table, spec)
    second = toxicity.score_table(table.slice(0, 2), spec)
    assert len(builds) == 1  # the second batch found the first one's scorer
    assert [len(call) for call in scorer.calls] == [6, 6, 2, 4]  # 3 + 3 + 1 rows, two turns each; then 2 rows
    assert first["id"].to_pylist() == [f"r{i}" for i in range(7)]
    assert first["drop_reason"].to_pylist() == [None] * 4 + ["toxic_assistant"] + [None] * 2
    assert second.num_rows == 2
    toxicity.score_table(table.slice(0, 1), ToxicitySpec(batch_size=3, threshold=0.2))  # another spec, another scorer
    assert len(builds) == 2


def test_compute_auto_scores_profanity_in_tasks_and_detoxify_on_actors():
    from chatforge.data.toxicity import uses_tasks

    assert uses_tasks(ToxicitySpec())
    assert not uses_tasks(ToxicitySpec(backend="detoxify"))
    assert not uses_tasks(ToxicitySpec(compute="actors"))
    assert uses_tasks(ToxicitySpec(backend="detoxify", compute="tasks"))
