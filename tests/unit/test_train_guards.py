"""The training loop's guards: a non-finite step stops every rank alike; a non-finite eval is never a new best."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chatforge.train.loop import NonFiniteLossError, improved, non_finite_message, stop_if_not_finite

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("eval_loss", "best", "min_delta", "expected"),
    [
        (2.0, INF, 0.0, True),  # the first evaluation
        (1.9, 2.0, 0.0, True),
        (1.95, 2.0, 0.1, False),  # better, but not by more than min_delta
        (1.85, 2.0, 0.1, True),
        (2.0, 2.0, 0.0, False),
        (NAN, INF, 0.0, False),  # NaN is no improvement, even over no best at all
        (NAN, 2.0, 0.0, False),
        (INF, INF, 0.0, False),
        (-INF, 2.0, 0.0, False),  # would otherwise beat every finite loss for the rest of the run
    ],
)
def test_early_stopping_comparison(eval_loss, best, min_delta, expected):
    assert improved(eval_loss, best, min_delta) is expected


def test_non_finite_message_names_the_step_and_what_to_do():
    assert non_finite_message(7, 12.5, 3.0) is None
    for loss, norm in ((NAN, 1.0), (INF, 1.0), (1.0, NAN), (1.0, INF), (-INF, 0.0)):
        message = non_finite_message(7, loss, norm)
        assert message.startswith("step 7: ") and "not finite" in message
        assert "exports no model" in message and "train.lr" in message


# (each rank's step loss, each rank's gradient norm) per scenario; the ranks run them in order in one process group
SCENARIOS = [
    ([2.5, NAN], [1.0, 1.0]),  # rank 1 alone sees NaN: both must raise, or rank 0 would hang in its next collective
    ([2.5, 2.4], [INF, INF]),  # the global norm overflowed
    ([2.5, 2.4], [1.0, None]),  # finite; a rank whose engine reports no norm
]


def _rank(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for i, (losses, norms) in enumerate(SCENARIOS):
            try:
                stop_if_not_finite(3, losses[rank], norms[rank], world, torch.device("cpu"))
                results[i * world + rank] = "ok"
            except NonFiniteLossError as err:
                results[i * world + rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step_when_one_rank_is_not_finite(tmp_path):
    results = mp.get_context("spawn").Manager().list([""] * 2 * len(SCENARIOS))
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    nan_on_one_rank, overflowed_norm, finite = (list(results[i : i + 2]) for i in range(0, len(results), 2))
    for both in (nan_on_one_rank, overflowed_norm):
        assert all(r.startswith("step 3: ") and "not finite" in r for r in both), both
    assert "(summed over ranks: nan)" in nan_on_one_rank[0] and "gradient norm (inf)" in overflowed_norm[0]
    assert finite == ["ok", "ok"]


def test_an_output_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    """Ray Train restores what it finds at a run's storage path: a new run into an OUTPUT that holds one neither
    continues it silently nor deletes its checkpoints silently."""
    from chatforge.config import load_spec
    from chatforge.train.trainer import RunExistsError, checkpoint_storage, run_training

    output = tmp_path / "out"
    storage, name = checkpoint_storage(None, str(output))
    os.makedirs(os.path.join(storage, name, "checkpoint_000001"))
    spec = load_spec(None, [f"train.output={output}", f"train.data=[{{path: '{tmp_path / 'data'}'}}]"])
    with pytest.raises(RunExistsError, match=r"holds an earlier run's checkpoints .*pass --overwrite .*train.resume"):
        run_training(spec)
    assert os.path.isdir(os.path.join(storage, name, "checkpoint_000001"))  # nothing deleted
