"""The tune section: distributions, Ray Tune's param space, trial specs, and the checks before a search starts."""

from __future__ import annotations

import pytest

from chatforge.config import SpecError, load_spec
from chatforge.tune.space import check_space, param_space, trial_spec

SPACE = (
    "tune.space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}, train.batch_size: {choice: [2, 4]}, "
    "model.dropout: {uniform: [0.0, 0.2]}, train.warmup_steps: {randint: [0, 10]}, "
    "train.weight_decay: {choice: [0.0, 0.1]}, lora.r: {choice: [8, 16]}, deepspeed.zero_stage: {choice: [0, 2, 3]}}"
)


def test_the_issue_s_dimensions_map_to_ray_tune():
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = load_spec(None, [SPACE])
    check_space(spec)
    space = param_space(spec.tune.space)
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert isinstance(space["train.warmup_steps"], Integer)
    assert isinstance(space["deepspeed.zero_stage"], Categorical) and space["deepspeed.zero_stage"].categories == [
        0,
        2,
        3,
    ]


def test_grid_dimensions_are_grid_searches():
    spec = load_spec(None, ["tune.algorithm=grid", "tune.space={train.lr: {grid: [0.001, 0.01]}}"])
    assert param_space(spec.tune.space) == {"train.lr": {"grid_search": [0.001, 0.01]}}


def test_a_trial_spec_is_the_spec_with_the_trial_s_values():
    import numpy as np

    spec = load_spec(None, [SPACE])
    trial = trial_spec(spec, {"train.lr": np.float64(0.003), "lora.r": 16, "deepspeed.zero_stage": 3})
    assert (trial.train.lr, trial.lora.r, trial.deepspeed.zero_stage) == (0.003, 16, 3)
    assert trial.train.data == spec.train.data and trial.tune == spec.tune


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={train.lr: {loguniform: [0.0, 1.0]}}", "low must be above 0"),
        ("tune.space={train.lr: {uniform: [0.1, 0.01]}}", "must be below high"),
        ("tune.space={train.lr: {uniform: [0.1, 0.2], choice: [1]}}", "exactly one of"),
        ("tune.space={train.lr: {normal: [0, 1]}}", "unknown key"),
        ("tune.space={lora.r: {choice: []}}", "at least one value"),
    ],
)
def test_bad_distributions_name_what_is_wrong(override, message):
    with pytest.raises(SpecError, match=message):
        load_spec(None, [override])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{serve.port: {choice: [1, 2]}}", "not a key a trial may vary"),
        ("{train.output: {choice: [a, b]}}", "not a key a trial may vary"),
        ("{model.max_length: {choice: [64, 128]}}", "not a key a trial may vary"),
        ("{train.lrr: {choice: [0.1]}}", "no such key"),
        ("{deepspeed.zero_stage: {choice: [0, 4]}}", "4 is not a valid value"),
        ("{train.batch_size: {randint: [0, 4]}}", "0 is not a valid value"),
    ],
)
def test_a_search_that_could_not_run_is_refused_before_any_trial(space, message):
    spec = load_spec(None, [f"tune.space={space}"])
    with pytest.raises(SpecError, match=message):
        check_space(spec)


def test_an_empty_space_is_refused():
    with pytest.raises(SpecError, match="tune.space is empty"):
        check_space(load_spec(None, []))


def test_optuna_takes_no_grid_and_grid_takes_no_ranges():
    with pytest.raises(SpecError, match="optuna does not take grid"):
        load_spec(None, ["tune.algorithm=optuna", "tune.space={train.lr: {grid: [0.1]}}"])
    with pytest.raises(SpecError, match="grid needs grid"):
        load_spec(None, ["tune.algorithm=grid", "tune.space={train.lr: {uniform: [0.1, 0.2]}}"])


@pytest.mark.parametrize("path", ["pipelines/tune.yaml", "pipelines/tune-lora.yaml"])
def test_the_shipped_search_specs_parse_and_check(path):
    spec = load_spec(path)
    check_space(spec)
    assert spec.tune.num_samples >= 4 and spec.tune.scheduler == "asha"
