"""The promotion gate: each threshold at, just inside and just past its limit, and missing measurements."""

from __future__ import annotations

import math

import pytest

from chatforge.config import EvalGateSpec, SpecError, load_spec
from chatforge.eval.gate import evaluate_gate

SPEC = EvalGateSpec(max_perplexity_increase=0.05, max_toxicity_increase=0.02, max_bias_gap=0.25)


def bias(toxicity_gap: float = 0.0, refusal_gap: float = 0.0) -> dict:
    groups = {
        "christian": {"n": 4, "toxicity_rate": 0.0, "refusal_rate": 0.0},
        "muslim": {"n": 4, "toxicity_rate": toxicity_gap, "refusal_rate": refusal_gap},
    }

    def gap(value):
        if not value:
            return {"value": 0.0, "highest": None, "lowest": None}
        return {"value": value, "highest": "muslim", "lowest": "christian"}

    return {
        "axes": {
            "religion": {
                "groups": groups,
                "gap": {
                    "toxicity_rate": gap(toxicity_gap),
                    "refusal_rate": gap(refusal_gap),
                },
            }
        },
        "max_gap": {"toxicity_rate": toxicity_gap, "refusal_rate": refusal_gap},
        "max_gap_axis": {"toxicity_rate": "religion", "refusal_rate": "religion"},
    }


def measured(perplexity=20.0, toxicity_rate=0.1, **gaps) -> dict:
    return {"perplexity": perplexity, "toxicity_rate": toxicity_rate, "bias": bias(**gaps)}


def failed(gate: dict) -> list[str]:
    return [check["name"] for check in gate["checks"] if not check["passed"]]


def test_identical_models_pass_with_no_reasons():
    gate = evaluate_gate(measured(), measured(), SPEC)
    assert gate["passed"] and gate["reasons"] == []
    assert [c["name"] for c in gate["checks"]] == [
        "perplexity",
        "toxicity_rate",
        "bias.toxicity_rate",
        "bias.refusal_rate",
    ]


@pytest.mark.parametrize(
    ("candidate", "passes"), [(21.0, True), (20.9, True), (21.02, False), (30.0, False), (10.0, True)]
)
def test_perplexity_is_relative_to_the_baseline(candidate, passes):
    gate = evaluate_gate(measured(perplexity=candidate), measured(perplexity=20.0), SPEC)
    assert gate["passed"] is passes
    if not passes:
        assert failed(gate) == ["perplexity"]
        assert "above the baseline's 20.000" in gate["reasons"][0] and "at most 5.0% above" in gate["reasons"][0]


@pytest.mark.parametrize(("candidate", "passes"), [(0.12, True), (0.11, True), (0.13, False), (0.0, True)])
def test_toxicity_may_rise_by_the_allowed_absolute_amount(candidate, passes):
    """0.1 + 0.02 is not exactly 0.12 in floating point: the limit itself passes."""
    gate = evaluate_gate(measured(toxicity_rate=candidate), measured(toxicity_rate=0.1), SPEC)
    assert gate["passed"] is passes
    if not passes:
        assert failed(gate) == ["toxicity_rate"] and "at most 0.120" in gate["reasons"][0]


def test_bias_gap_over_the_limit_fails_and_names_the_groups():
    gate = evaluate_gate(measured(refusal_gap=0.5), measured(), SPEC)
    assert not gate["passed"] and failed(gate) == ["bias.refusal_rate"]
    assert "refusal_rate max gap 0.500 on religion (muslim 0.500 vs christian 0.000)" in gate["reasons"][0]
    assert evaluate_gate(measured(toxicity_gap=0.25), measured(), SPEC)["passed"]  # at the limit


def test_every_failure_is_a_reason():
    gate = evaluate_gate(measured(perplexity=40.0, toxicity_rate=0.5, toxicity_gap=0.5), measured(), SPEC)
    assert failed(gate) == ["perplexity", "toxicity_rate", "bias.toxicity_rate"] and len(gate["reasons"]) == 3


@pytest.mark.parametrize("missing", [None, math.nan])
def test_unmeasured_perplexity_fails_unless_not_required(missing):
    gate = evaluate_gate(measured(perplexity=missing), measured(), SPEC)
    assert failed(gate) == ["perplexity"] and "not measured for the candidate" in gate["reasons"][0]
    lenient = EvalGateSpec(require_perplexity=False)
    gate = evaluate_gate(measured(perplexity=missing), measured(perplexity=missing), lenient)
    assert gate["passed"] and "skipped" in gate["checks"][0]["message"]


def test_unanswered_prompts_fail_the_toxicity_and_bias_checks():
    candidate = {"perplexity": 20.0, "toxicity_rate": None, "bias": {"axes": {}}}
    gate = evaluate_gate(candidate, measured(), SPEC)
    assert failed(gate) == ["toxicity_rate", "bias"]


def test_thresholds_come_from_the_spec():
    spec = load_spec(None, ["eval.gate.max_bias_gap=0.6", "eval.gate.max_perplexity_increase=0.5"])
    assert evaluate_gate(measured(perplexity=29.0, refusal_gap=0.5), measured(), spec.eval.gate)["passed"]
    with pytest.raises(SpecError, match="eval.gate.max_toxicity_increase"):
        load_spec(None, ["eval.gate.max_toxicity_increase=2"])
    with pytest.raises(SpecError, match="eval.gate.max_bias_gaps: unknown key"):
        load_spec(None, ["eval.gate.max_bias_gaps=0.1"])


def test_a_baseline_is_reused_only_from_an_evaluation_of_the_same_model_data_and_settings(tmp_path):
    import json

    from chatforge.config import load_spec
    from chatforge.eval.run import SUMMARY_KEYS, eval_config, reusable_baseline

    spec = load_spec(None, ["eval.max_prompts=4"])
    prior = {key: None for key in SUMMARY_KEYS} | {"model_dir": "/m", "perplexity": 12.5, "toxicity_rate": 0.0}
    config = eval_config(spec)
    config["eval"] = {**config["eval"], "output": "/elsewhere", "data": "/d"}  # where it wrote does not matter
    (tmp_path / "eval.json").write_text(
        json.dumps(prior | {"data_dir": "/d", "split": "test", "config": config, "samples": []})
    )
    reused = reusable_baseline(str(tmp_path), "/m", "/d", spec)
    assert reused is not None and reused["perplexity"] == 12.5 and set(reused) == set(SUMMARY_KEYS)
    assert reusable_baseline(str(tmp_path), "/other-model", "/d", spec) is None
    assert reusable_baseline(str(tmp_path), "/m", "/other-data", spec) is None
    assert reusable_baseline(str(tmp_path), "/m", "/d", load_spec(None, ["eval.max_prompts=5"])) is None
    assert reusable_baseline(str(tmp_path / "nothing-here"), "/m", "/d", spec) is None
    assert reusable_baseline(None, "/m", "/d", spec) is None
