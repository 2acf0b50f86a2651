"""A/B routing between model variants: a weighted pick, sticky per user.

A sticky key (the request's ``user``, else the API key id) is hashed with xxh64 (stable across processes and
Python runs, unlike ``hash()``) to a point in [0, 1), which falls in one variant's share of the cumulative
weights. So every replica of the ingress sends a user to the same variant, and changing weights moves only the
users whose point lies in the shares that changed. A variant of weight 0 gets no traffic by weight but can still
be asked for by name (the request's ``model``), e.g. for a canary checked by hand.
"""

from __future__ import annotations

import bisect
import itertools
import random

import xxhash

from chatforge.config import VariantSpec

_SALT = b"chatforge-router:"  # keeps the buckets independent of other xxh64 uses of the same ids


def sticky_point(key: str) -> float:
    """A stable point in [0, 1) for ``key``."""
    return xxhash.xxh64_intdigest(_SALT + key.encode()) / 2.0**64


def reweighted(variants: list[VariantSpec], weights: dict[str, float]) -> list[VariantSpec]:
    """``variants`` with the traffic weights of ``weights`` (a variant it does not name keeps its own); a weight
    for an unknown variant, a negative one, or all weights zero is a ValueError naming it."""
    names = {v.name for v in variants}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise ValueError(f"weights name unknown variants {unknown}; known: {sorted(names)}")
    bad = {name: w for name, w in weights.items() if not isinstance(w, int | float) or isinstance(w, bool) or w < 0}
    if bad:
        raise ValueError(f"weights must be numbers >= 0, got {bad}")
    updated = [v.model_copy(update={"weight": float(weights.get(v.name, v.weight))}) for v in variants]
    if sum(v.weight for v in updated) <= 0:
        raise ValueError(f"at least one variant needs a weight > 0, got {weights}")
    return updated


class Router:
    def __init__(self, variants: list[VariantSpec]) -> None:
        if not variants:
            raise ValueError("the router needs at least one variant")
        self.names = [v.name for v in variants]
        weights = [float(v.weight) for v in variants]
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"at least one variant needs a weight > 0, got {dict(zip(self.names, weights))}")
        self.weights = weights
        # cumulative upper bounds of each variant's share of [0, 1); a zero weight gives an empty share
        self._bounds = [bound / total for bound in itertools.accumulate(weights)]

    def _pick(self, point: float) -> str:
        index = bisect.bisect_right(self._bounds, point)
        # float rounding can leave the last bound a hair under 1; fall back to the last variant with weight
        if index >= len(self.names):
            index = max(i for i, w in enumerate(self.weights) if w > 0)
        return self.names[index]

    def choose(self, sticky_key: str | None, requested: str | None = None) -> str:
        """The variant for a request: ``requested`` when it names one, else by weight (sticky when keyed)."""
        if requested is not None:
            if requested not in self.names:
                raise ValueError(f"unknown model {requested!r}; known: {', '.join(self.names)}")
            return requested
        if sticky_key:
            return self._pick(sticky_point(sticky_key))
        return self._pick(random.random())
