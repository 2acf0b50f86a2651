"""The training loop without Ray: `run_steps` on the tiny scratch GPT, DeepSpeed on CPU in a one-process gloo group."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from chatforge.config import load_spec
from chatforge.train.data import PackRows, TokenizeSamples
from chatforge.train.engine import build_engine, export_model, init_distributed
from chatforge.train.loop import (
    LoopState,
    NonFiniteLossError,
    load_checkpoint,
    micro_batches,
    run_steps,
    save_checkpoint,
)
from chatforge.train.metrics import MetricsHistory
from chatforge.train.model import train_tokenizer
from helpers.corpus import conversation
from helpers.train_data import TINY_TRAINING

SETTINGS = (*TINY_TRAINING, "train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=4")


@pytest.fixture(scope="module")
def process_group():
    """A gloo process group of this one process, as torchrun would describe it, torn down after the module."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": "0",
            "LOCAL_RANK": "0",
        }.items():
            env.setenv(key, value)
        env.setenv("WORLD_SIZE", "1")
        env.setenv("LOCAL_WORLD_SIZE", "1")
        init_distributed(use_gpu=False)
        yield
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def data():
    """(tokenizer, train batches, val batches): conversations tokenized and packed as training does; five train
    batches, so that eight steps take more than an epoch."""
    rng = random.Random(0)
    conversations = [conversation(rng, turns=rng.choice([2, 4]), words=(4, 9)) for _ in range(200)]
    tokenizer = train_tokenizer((m["content"] for c in conversations for m in c), 400)
    spec = load_spec(None, list(SETTINGS))
    samples = TokenizeSamples(tokenizer, spec.model.max_length, tag=None, domain=0)(
        pa.table({"messages": pa.array(conversations)})
    )
    rows = PackRows(spec.model.max_length, tokenizer.pad_token_id, packing=True)(samples)
    size = spec.train.batch_size
    batches = [
        {key: torch.from_numpy(np.asarray(value[i : i + size])).long() for key, value in rows.items()}
        for i in range(0, len(rows["input_ids"]) - size + 1, size)
    ]
    return tokenizer, batches[2:7], batches[:2]


class Calls:
    """A step callback that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def after_step(self, state: LoopState, checkpoint: bool) -> None:
        self.calls.append((state.step, checkpoint))


class Stopped(Exception):
    pass


class CheckpointAndStop:
    """Saves a checkpoint when one is due, and stops the run at ``stop_at`` (`Stopped`): a worker that dies there."""

    def __init__(self, engine, history: MetricsHistory, directory: str, stop_at: int) -> None:
        self.engine, self.history, self.directory, self.stop_at = engine, history, directory, stop_at

    def after_step(self, state: LoopState, checkpoint: bool) -> None:
        if checkpoint:
            save_checkpoint(self.engine, state, self.directory, lora=False)
            self.history.write(self.directory)
        if state.step == self.stop_at:
            raise Stopped


def train(spec, tokenizer, data, state=None, history=None, callbacks=(), engine=None):
    _, train_batches, val_batches = data
    engine = engine or build_engine(spec, tokenizer)
    state = state or LoopState()
    history = history if history is not None else MetricsHistory()
    batches = micro_batches(lambda: iter(train_batches), state, spec.train.batch_size)
    run_steps(engine, batches, state, spec.train, val_batches, history, callbacks)
    return engine, state, history


def test_the_loop_needs_no_ray():
    code = "import sys, chatforge.train.loop, chatforge.train.engine; assert 'ray' not in sys.modules, 'ray'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_steps_trains_logs_evaluates_and_calls_back(process_group, data, tmp_path):
    tokenizer = data[0]
    spec = load_spec(None, list(SETTINGS))
    calls = Calls()
    engine, state, history = train(spec, tokenizer, data, callbacks=[calls])

    assert state.step == 8 and not state.stopped_early
    losses = [row["loss"] for row in history.rows if "loss" in row]
    assert [row["step"] for row in history.rows if "loss" in row] == [2, 4, 6, 8]
    assert losses[-1] < losses[0] - 0.3, losses
    evals = [row for row in history.rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [4, 8] and all(row["weight_norm"] > 0 for row in evals)
    assert state.best_step == 8 and state.best_eval_loss == evals[-1]["eval_loss"]
    # after every step but the last, with a checkpoint due at every checkpoint_every steps
    assert calls.calls == [(1, False), (2, False), (3, False), (4, True), (5, False), (6, False), (7, False)]

    export_model(engine, spec, tokenizer, state.best_weights, str(tmp_path))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    norm = sum(float(p.detach().double().pow(2).sum()) for p in exported.parameters()) ** 0.5
    assert norm == pytest.approx(evals[-1]["weight_norm"], rel=1e-6)


def test_a_run_resumed_from_its_checkpoint_matches_an_uninterrupted_one(process_group, data, tmp_path):
    tokenizer = data[0]
    spec = load_spec(None, list(SETTINGS))
    _, straight, straight_history = train(spec, tokenizer, data)

    history, engine = MetricsHistory(), build_engine(spec, tokenizer)
    stop = CheckpointAndStop(engine, history, str(tmp_path), stop_at=6)  # after the step-4 checkpoint
    with pytest.raises(Stopped):
        train(spec, tokenizer, data, history=history, engine=engine, callbacks=[stop])
    engine = build_engine(spec, tokenizer)
    state, history = load_checkpoint(engine, str(tmp_path)), MetricsHistory.read(str(tmp_path))
    assert state.step == 4 and [row["step"] for row in history.rows] == [2, 4, 4]  # two log rows and an eval
    _, resumed, history = train(spec, tokenizer, data, state=state, history=history, engine=engine)

    position = ("step", "epoch", "micro_batches_in_epoch")
    assert (straight.epoch, straight.micro_batches_in_epoch) == (1, 3)
    assert {k: getattr(resumed, k) for k in position} == {k: getattr(straight, k) for k in position}
    assert len(history.rows) == len(straight_history.rows)
    for a, b in zip(history.rows, straight_history.rows, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "eval_loss", "weight_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])


def test_a_step_that_is_not_finite_stops_the_run_before_it_is_logged(process_group, data):
    tokenizer = data[0]
    overrides = ("train.lr=1e30", "train.warmup_steps=0", "train.schedule=constant", "train.log_every=1")
    spec = load_spec(None, [*SETTINGS, *overrides])
    calls, history = Calls(), MetricsHistory()
    with pytest.raises(NonFiniteLossError, match=r"step 2: the training loss .* is not finite"):
        train(spec, tokenizer, data, history=history, callbacks=[calls])
    assert [row["step"] for row in history.rows] == [1] and calls.calls == [(1, False)]
