"""Refusal detection, toxicity rates and bias gaps over scored rows; sampling seeds and row building."""

from __future__ import annotations

import json

import pytest

from chatforge.config import REFUSAL_PHRASES, EvalSpec, GuardSpec
from chatforge.eval.generate import build_rows, pool_size, sampling_seed
from chatforge.eval.metrics import bias_summary, gap, is_refusal, toxicity_summary
from chatforge.eval.prompts import load_probes, load_prompts


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m SORRY,   but no.", True),  # curly apostrophe, case, spacing
        ("As an AI, I don't have weekends.", True),
        ("Sure! Here is a recipe for soup.", False),
        ("I won't forget the day we met.", False),  # 'won't' alone is no refusal
        ("", False),
    ],
)
def test_refusal_phrases(text, refused):
    assert is_refusal(text, REFUSAL_PHRASES) is refused


def test_the_guards_refusal_counts():
    refusal = GuardSpec().refusal
    assert is_refusal(f"  {refusal.upper()} ", [], refusal)
    assert not is_refusal("Let's keep talking!", [], refusal)


def row(toxicity, refused=False, category="c", axis=None, group=None, error=None):
    return {
        "toxicity": toxicity,
        "refused": refused,
        "category": category,
        "axis": axis,
        "group": group,
        "error": error,
    }


def test_toxicity_rate_counts_answers_at_or_over_the_threshold_and_skips_errors():
    rows = [row(0.9), row(0.5), row(0.5, refused=True), row(0.1, category="d"), row(None, error="PromptTooLong: ...")]
    summary = toxicity_summary(rows, threshold=0.5)
    assert summary["generations"] == 5 and summary["answered"] == 4 and summary["errors"] == 1
    assert summary["toxic"] == 3 and summary["toxicity_rate"] == 0.75 and summary["refusal_rate"] == 0.25
    assert summary["by_category"] == {
        "c": {"n": 3, "toxicity_rate": 1.0, "refusal_rate": pytest.approx(1 / 3)},
        "d": {"n": 1, "toxicity_rate": 0.0, "refusal_rate": 0.0},
    }
    assert sorted(summary["scores"]) == [0.1, 0.5, 0.5, 0.9]


def test_toxicity_rate_of_nothing_is_none():
    assert toxicity_summary([row(None, error="x")], 0.5)["toxicity_rate"] is None


def test_gap_is_highest_minus_lowest_and_ignores_groups_without_answers():
    assert gap({"a": 0.5, "b": 0.125, "c": None, "d": 0.25}) == {"value": 0.375, "highest": "a", "lowest": "b"}
    assert gap({"a": 0.2, "b": 0.2}) == {"value": 0.0, "highest": None, "lowest": None}
    assert gap({"a": 0.2, "b": None}) == {"value": 0.0, "highest": None, "lowest": None}


def test_bias_gaps_per_axis_and_the_max_over_axes():
    rows = []
    # religion: toxicity 2/4 vs 0/4 -> gap 0.5; refusals equal
    for i in range(4):
        rows.append(row(0.9 if i < 2 else 0.1, axis="religion", group="muslim"))
        rows.append(row(0.1, axis="religion", group="christian"))
    # age: refusal 3/4 vs 1/4 -> gap 0.5 (and toxicity 0); one errored probe is left out of the rates
    for i in range(4):
        rows.append(row(0.1, refused=i < 3, axis="age", group="old"))
        rows.append(row(0.1, refused=i < 1, axis="age", group="young"))
    rows.append(row(None, axis="age", group="young", error="PromptTooLong"))
    bias = bias_summary(rows, threshold=0.5)
    religion, age = bias["axes"]["religion"], bias["axes"]["age"]
    assert religion["groups"]["muslim"] == {"n": 4, "toxicity_rate": 0.5, "refusal_rate": 0.0, "mean_toxicity": 0.5}
    assert religion["gap"]["toxicity_rate"] == {"value": 0.5, "highest": "muslim", "lowest": "christian"}
    assert age["gap"]["refusal_rate"] == {"value": 0.5, "highest": "old", "lowest": "young"}
    assert age["groups"]["young"]["n"] == 4 and bias["errors"] == 1 and bias["probes"] == 17
    assert bias["max_gap"] == {"toxicity_rate": 0.5, "refusal_rate": 0.5}
    assert bias["max_gap_axis"] == {"toxicity_rate": "religion", "refusal_rate": "age"}


def test_a_group_with_no_answer_is_listed_and_left_out_of_the_gap():
    rows = [
        row(0.9, axis="age", group="old"),
        row(0.1, axis="age", group="young"),
        row(None, axis="age", group="teen", error="x"),
    ]
    bias = bias_summary(rows, 0.5)
    assert bias["axes"]["age"]["groups"]["teen"] == {
        "n": 0,
        "toxicity_rate": None,
        "refusal_rate": None,
        "mean_toxicity": None,
    }
    assert bias["max_gap"]["toxicity_rate"] == 1.0


def test_probes_of_one_template_share_seeds_and_prompts_differ_only_in_the_term():
    spec = EvalSpec(generations_per_prompt=2, seed=7)
    prompts = load_prompts(limit=3)
    probes = load_probes(axes=["religion"], max_templates=2)
    rows = build_rows(prompts, probes, spec, explained={prompts[0].id})
    assert len(rows) == (3 + len(probes)) * 2 and [r["row"] for r in rows] == list(range(len(rows)))
    assert [r["want_logprobs"] for r in rows].count(True) == 1 and rows[0]["want_logprobs"]
    bias_rows = [r for r in rows if r["axis"] == "religion" and r["template"] == probes[0].template]
    assert len({r["seed"] for r in bias_rows if r["sample_index"] == 0}) == 1  # the same draw for every group
    assert len({r["seed"] for r in bias_rows}) == 2  # answer indexes differ
    texts = {json.loads(r["messages"])[-1]["content"] for r in bias_rows}
    assert len(texts) == len({p.group for p in probes})
    assert sampling_seed(7, "x", 0) == sampling_seed(7, "x", 0) != sampling_seed(8, "x", 0)


def test_system_prompt_goes_first():
    spec = EvalSpec(system_prompt="Be kind.")
    rows = build_rows(load_prompts(limit=1), [], spec)
    assert json.loads(rows[0]["messages"])[0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize(
    ("concurrency", "num_cpus", "rows", "cluster", "expected"),
    [
        (None, 1.0, 100, 2.0, 2),
        (None, 1.0, 1, 2.0, 1),
        (None, 0.5, 100, 2.0, 4),
        (3, 1.0, 100, 2.0, 3),
        (None, 4.0, 9, 2.0, 1),
    ],
)
def test_pool_size(concurrency, num_cpus, rows, cluster, expected):
    assert pool_size(EvalSpec(concurrency=concurrency, num_cpus=num_cpus), rows, cluster) == expected
