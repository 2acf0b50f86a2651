"""When the canary's feedback says promote, roll back, or wait: a two-proportion z-test on positive-rating rates.

Each variant's rate is its +1 ratings over all its ratings. The test is two-sided at ``alpha``; below
``min_ratings`` ratings on either side the answer is ``wait`` whatever the rates, because early rates swing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    decision: str  # promote | rollback | wait
    canary_rate: float | None
    production_rate: float | None
    z: float | None
    p_value: float | None
    reason: str


def two_proportion_z(positive_a: int, n_a: int, positive_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) for rate a - rate b under the pooled null hypothesis that the rates are equal."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError("both samples need at least one rating")
    pooled = (positive_a + positive_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    difference = positive_a / n_a - positive_b / n_b
    if spread == 0:  # every rating on both sides the same: no evidence either way
        return 0.0, 1.0
    z = difference / spread
    return z, math.erfc(abs(z) / math.sqrt(2))


def compare_variants(
    canary: tuple[int, int], production: tuple[int, int], alpha: float = 0.05, min_ratings: int = 100
) -> Comparison:
    """``canary`` and ``production`` as (positive ratings, all ratings)."""
    (pos_c, n_c), (pos_p, n_p) = canary, production
    rate_c = pos_c / n_c if n_c else None
    rate_p = pos_p / n_p if n_p else None
    if min(n_c, n_p) < min_ratings:
        return Comparison(
            "wait", rate_c, rate_p, None, None, f"{min(n_c, n_p)} ratings on the smaller side, {min_ratings} needed"
        )
    z, p = two_proportion_z(pos_c, n_c, pos_p, n_p)
    if p >= alpha:
        return Comparison("wait", rate_c, rate_p, z, p, f"no significant difference (p={p:.3g} >= {alpha})")
    decision = "promote" if z > 0 else "rollback"
    better = "better" if z > 0 else "worse"
    return Comparison(decision, rate_c, rate_p, z, p, f"canary significantly {better} (z={z:.2f}, p={p:.3g})")
