"""The search space of a spec's ``tune`` section: Ray Tune's param space, and each trial's own training spec.

A dimension is a dotted training key (``train.lr``, ``lora.r``, ``deepspeed.zero_stage``, ...) and a
`Distribution`; a trial's config maps the same keys to values, and `trial_spec` applies them to the spec as
overrides, so a trial is validated like any `chatforge train` spec.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from chatforge.config import Distribution, Spec, SpecError, _set_dotted, describe_errors, resolved

# The sections a search may vary: what `chatforge train` reads, minus where it reads and writes and what shapes the
# data, which is tokenized and packed once for every trial.
SEARCHABLE = ("model", "train", "deepspeed", "method", "lora", "scaling")
FIXED = (
    "train.data",
    "train.output",
    "train.resume",
    "train.packing",
    "model.name_or_path",
    "model.max_length",
    "model.vocab_size",
    "scaling.num_workers",  # the train set is cut into this many shards once, before the trials
)


def param_space(space: dict[str, Distribution]) -> dict[str, Any]:
    """Ray Tune's param space for ``space`` (flat, dotted keys)."""
    from ray import tune

    def dimension(d: Distribution):
        match d.kind:
            case "loguniform":
                return tune.loguniform(*d.loguniform)
            case "uniform":
                return tune.uniform(*d.uniform)
            case "randint":
                return tune.randint(*d.randint)
            case "choice":
                return tune.choice(d.choice)
            case _:
                return tune.grid_search(d.grid)

    return {key: dimension(d) for key, d in space.items()}


def trial_spec(spec: Spec, config: dict[str, Any]) -> Spec:
    """``spec`` with a trial's values set (dotted keys), validated; a SpecError names the key that is wrong."""
    tree = copy.deepcopy(resolved(spec))
    for key, value in config.items():
        _set_dotted(tree, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from searchers
    try:
        return Spec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_errors(err, f"trial {config}")) from None


def check_space(spec: Spec) -> None:
    """Refuse a search whose space names a key no trial may vary, or a value the spec would reject, before any
    trial starts: every key must be a training key, and each dimension's extremes must validate."""
    if not spec.tune.space:
        raise SpecError("tune.space is empty: give at least one dimension, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    for key, dimension in spec.tune.space.items():
        if key.split(".")[0] not in SEARCHABLE or any(key == f or key.startswith(f + ".") for f in FIXED):
            raise SpecError(
                f"tune.space.{key}: not a key a trial may vary; search keys under {', '.join(SEARCHABLE)} "
                f"(except {', '.join(FIXED)})"
            )
        if _missing(spec, key):
            raise SpecError(f"tune.space.{key}: no such key in the spec (check the spelling)")
        for value in dimension.extremes():
            try:
                trial_spec(spec, {key: value})
            except SpecError as err:
                raise SpecError(f"tune.space.{key}: {value!r} is not a valid value\n{err}") from None


def _missing(spec: Spec, key: str) -> bool:
    node: Any = resolved(spec)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return True
        node = node[part]
    return False
