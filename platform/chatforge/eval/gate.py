"""The promotion gate: does a candidate model meet the spec's thresholds against its baseline? A pure function.

Three checks, each with a message saying what was measured against what limit:
  perplexity  the candidate's test perplexity at most ``max_perplexity_increase`` (relative) above the baseline's;
  toxicity    the candidate's toxicity rate at most the baseline's + ``max_toxicity_increase`` (absolute);
  bias        each bias metric's ``max_gap`` of the candidate at most ``max_bias_gap`` (absolute).
A measurement that is missing fails its check (the gate cannot vouch for what it did not see), except perplexity
when ``require_perplexity`` is off. ``reasons`` lists the failed checks' messages: empty exactly when it passes.
"""

from __future__ import annotations

import math

from chatforge.config import EvalGateSpec

# Rates are fractions of small counts: 0.1 + 0.02 is not exactly 0.12 in floating point.
TOLERANCE = 1e-9


def _measured(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def _check(name: str, passed: bool, message: str, value=None, baseline=None, limit=None) -> dict:
    return {"name": name, "passed": passed, "value": value, "baseline": baseline, "limit": limit, "message": message}


def perplexity_check(candidate: float | None, baseline: float | None, spec: EvalGateSpec) -> dict:
    allowed = spec.max_perplexity_increase
    if not (_measured(candidate) and _measured(baseline)):
        missing = " and ".join(
            name for name, value in (("candidate", candidate), ("baseline", baseline)) if not _measured(value)
        )
        message = f"perplexity was not measured for the {missing}: pass a curated data dir with a test split"
        if not spec.require_perplexity:
            return _check("perplexity", True, f"{message} (skipped: eval.gate.require_perplexity is off)")
        return _check("perplexity", False, message, candidate, baseline, allowed)
    increase = candidate / baseline - 1.0
    passed = increase <= allowed + TOLERANCE
    relation = "above" if increase >= 0 else "below"
    message = (
        f"perplexity {candidate:.3f} is {abs(increase):.1%} {relation} the baseline's {baseline:.3f} "
        f"(allowed: at most {allowed:.1%} above)"
    )
    return _check("perplexity", passed, message, candidate, baseline, allowed)


def toxicity_check(candidate: float | None, baseline: float | None, spec: EvalGateSpec) -> dict:
    allowed = spec.max_toxicity_increase
    if not (_measured(candidate) and _measured(baseline)):
        return _check(
            "toxicity_rate", False, "toxicity rate not measured: no prompt got an answer", candidate, baseline, allowed
        )
    passed = candidate <= baseline + allowed + TOLERANCE
    message = (
        f"toxicity rate {candidate:.3f} vs the baseline's {baseline:.3f} (allowed: at most {baseline + allowed:.3f}, "
        f"the baseline's + {allowed:g})"
    )
    return _check("toxicity_rate", passed, message, candidate, baseline, allowed)


def bias_checks(bias: dict | None, baseline_bias: dict | None, spec: EvalGateSpec) -> list[dict]:
    allowed = spec.max_bias_gap
    if not bias or not bias.get("axes"):
        return [_check("bias", False, "bias not measured: no probe got an answer", limit=allowed)]
    checks = []
    for metric, value in bias["max_gap"].items():
        axis = bias["max_gap_axis"].get(metric)
        where = ""
        if axis:
            detail = bias["axes"][axis]["gap"][metric]
            groups = bias["axes"][axis]["groups"]
            if detail["highest"] is not None:
                where = (
                    f" on {axis} ({detail['highest']} {groups[detail['highest']][metric]:.3f} vs "
                    f"{detail['lowest']} {groups[detail['lowest']][metric]:.3f})"
                )
        base = (baseline_bias or {}).get("max_gap", {}).get(metric)
        passed = value <= allowed + TOLERANCE
        message = f"bias: {metric} max gap {value:.3f}{where} (allowed: at most {allowed:g})"
        checks.append(_check(f"bias.{metric}", passed, message, value, base, allowed))
    return checks


def evaluate_gate(candidate: dict, baseline: dict, spec: EvalGateSpec) -> dict:
    """``{"passed", "reasons", "checks"}`` for a candidate's measurements against its baseline's.

    Both are per-model results with ``perplexity``, ``toxicity_rate`` and ``bias`` (see `chatforge.eval.run`)."""
    checks = [
        perplexity_check(candidate.get("perplexity"), baseline.get("perplexity"), spec),
        toxicity_check(candidate.get("toxicity_rate"), baseline.get("toxicity_rate"), spec),
        *bias_checks(candidate.get("bias"), baseline.get("bias"), spec),
    ]
    reasons = [check["message"] for check in checks if not check["passed"]]
    return {"passed": not reasons, "reasons": reasons, "checks": checks}
