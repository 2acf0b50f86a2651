"""The training loop, `run_steps`: optimizer steps on a DeepSpeed engine until ``max_steps`` or early stopping.

It runs without Ray: `chatforge.train.worker` is the Ray Train adapter around it, the training-overhead benchmark
runs it under torchrun, and the unit tests run it in one process. Each step, top to bottom: forward and backward over
``grad_accum`` micro-batches and the optimizer step (DeepSpeed accumulates, clips, and steps AdamW and the LR
schedule inside ``model.step()``); a loss or gradient norm that is not finite stops the run on every rank, before
anything of that step is logged or saved; a log row every ``log_every`` steps; an evaluation every ``eval_every``,
with early stopping; then the callbacks, told when a checkpoint is due. Every value a decision rests on is
all-reduced, so every rank decides alike, and every rank takes the same number of micro-steps (the train set is
split equally).

`save_checkpoint` and `load_checkpoint` keep a `LoopState` and the engine's own state in a directory, for a resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from chatforge.config import TrainLoopSpec
from chatforge.train.engine import MODEL_DIR as MODEL_DIR  # the final checkpoint's model dir; chatforge.tune reads it
from chatforge.train.engine import TrainEngine, allreduce_sum, gradient_norm, snapshot, weight_norm
from chatforge.train.metrics import MetricsLogger
from chatforge.train.tokenize import IGNORE_INDEX, PAD_SEQUENCE_ID, TENSOR_KEYS, model_inputs

STATE_FILE = "loop_state.json"
BEST_WEIGHTS_FILE = "best_weights.rank{rank}.safetensors"  # in a checkpoint: the rank's snapshot of the best eval

logger = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per GPU, for MFU (by device-name substring; unknown devices report no MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass
class LoopState:
    """Where a run is, beyond DeepSpeed's own state (weights, optimizer, scheduler): what a resume needs."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # data position: micro-batches of the current epoch already consumed
    best_eval_loss: float = math.inf
    best_step: int = 0  # the step of best_eval_loss
    evals_without_improvement: int = 0
    stopped_early: bool = False
    # This rank's CPU copy of the best evaluation's weights, kept while early stopping is on: what is exported.
    best_weights: list[torch.Tensor] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Every field but the best weights (a checkpoint holds those as safetensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best_weights"}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        """The state ``to_json`` gave; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)} - {"best_weights"}
        return cls(**{key: value for key, value in saved.items() if key in names})


class StepCallback(Protocol):
    def after_step(self, state: LoopState, checkpoint: bool) -> None:
        """Called on every rank after each optimizer step but the run's last, once its rows are logged.
        ``checkpoint``: the step is one of every ``checkpoint_every``, so the run's state is due to be saved."""


# ---------------------------------------------------------------- the loop


def run_steps(
    engine: TrainEngine,
    batches: Iterator[dict[str, torch.Tensor]],
    state: LoopState,
    settings: TrainLoopSpec,
    val_batches: Sequence[dict[str, torch.Tensor]],
    metrics: MetricsLogger,
    callbacks: Sequence[StepCallback] = (),
    domains: Sequence[str] = ("data",),
) -> LoopState:
    """Optimizer steps from ``state.step`` until ``settings.max_steps`` or early stopping; ``state`` is updated in
    place and returned.

    ``batches``: this rank's micro-batches, endless (`micro_batches`). ``val_batches``: the val set, the same batches
    every evaluation. ``metrics`` gets a row per log window and per evaluation. ``domains``: the name of each
    ``domain`` id in the batches, for per-dataset eval losses.
    Raises `NonFiniteLossError`, on every rank alike, at the first step whose loss or gradient norm is not finite.
    """
    model, device = engine.model, engine.device
    window = LogWindow()
    model.train()
    while state.step < settings.max_steps and not state.stopped_early:
        step_loss, grad_norm = 0.0, None
        for _ in range(settings.grad_accum):
            batch = _on_device(next(batches), device)
            loss = model(**model_inputs(batch)).loss
            model.backward(loss)
            if engine.zero_stage == 0 and model.is_gradient_accumulation_boundary():
                grad_norm = gradient_norm(model.module)  # ZeRO-0 reports none; the gradients are reduced by now
            model.step()  # at the accumulation boundary: clipping, the AdamW step, the LR schedule's step
            step_loss += loss.item()
            window.micro_batches += 1
            window.tokens += int((batch["sequence_ids"] != PAD_SEQUENCE_ID).sum())
        window.loss += step_loss
        if engine.zero_stage != 0:
            grad_norm = model.get_global_grad_norm()
        state.step += 1
        stop_if_not_finite(state.step, step_loss, grad_norm, engine.world, device)

        last = state.step == settings.max_steps
        if state.step % settings.log_every == 0 or last:
            metrics.log(state.step, window.metrics(engine, state.epoch, grad_norm))
            window = LogWindow()
        if state.step % settings.eval_every == 0 or last:
            evaluation = evaluate(engine, val_batches, domains, state.step)
            metrics.log(state.step, evaluation)
            record_evaluation(state, evaluation["eval_loss"], settings, engine, last)
        if state.stopped_early or last:
            break
        for callback in callbacks:
            callback.after_step(state, checkpoint=state.step % settings.checkpoint_every == 0)
    return state


# ---------------------------------------------------------------- data


def micro_batches(
    epoch: Callable[[], Iterable[dict[str, torch.Tensor]]], state: LoopState, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches forever, epoch after epoch, from the data position ``state`` holds, which they keep up to date.
    ``epoch()`` is one pass over this rank's rows in full batches of ``batch_size``."""
    skip = state.micro_batches_in_epoch
    while True:
        seen = 0
        for batch in epoch():
            seen += 1
            if skip:
                skip -= 1
                continue
            state.micro_batches_in_epoch += 1
            yield batch
        if seen == 0:
            raise ValueError(
                f"a worker got no full batch of {batch_size} rows: too little training data for "
                "train.batch_size x scaling.num_workers (lower them, or add data)"
            )
        state.epoch += 1
        state.micro_batches_in_epoch = 0


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in TENSOR_KEYS}


# ---------------------------------------------------------------- logging


@dataclass
class LogWindow:
    """This rank's sums over the steps since the last log row."""

    loss: float = 0.0  # over micro-batches
    micro_batches: int = 0
    tokens: int = 0  # non-pad
    started: float = field(default_factory=time.perf_counter)

    def metrics(self, engine: TrainEngine, epoch: int, grad_norm: float | None) -> dict[str, Any]:
        """The log row: mean loss over the window's micro-batches of all ranks, the LR, the gradient norm of the last
        step, tokens/s of all ranks over the window's wall time, and MFU on a GPU of known peak."""
        loss_sum, micro, tokens = allreduce_sum([self.loss, self.micro_batches, self.tokens], engine.device)
        elapsed = time.perf_counter() - self.started
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / micro,
            "lr": engine.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / elapsed,
        }
        flops_per_token = model_flops_per_token(engine.trainable_params, engine.total_params)
        if (mfu := _mfu(metrics["tokens_per_s"], flops_per_token, engine.world)) is not None:
            metrics["mfu"] = mfu
        return metrics


def model_flops_per_token(trainable: int, total: int) -> int:
    """Training FLOPs per token of the model's matmuls: 2 per parameter in forward, 2 in backward for the gradient
    of the activations, and 2 more per trainable parameter for its weight gradient. 6 per parameter when everything
    trains; about 4 under LoRA, whose frozen base gets no weight gradient. Attention scores are left out, and so is the
    forward that gradient checkpointing repeats (MFU counts the model's FLOPs, not the hardware's)."""
    return 4 * total + 2 * trainable


def _mfu(tokens_per_s: float, flops_per_token: int, world: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * world)


# ---------------------------------------------------------------- evaluation and early stopping


def evaluate(
    engine: TrainEngine, batches: Sequence[dict[str, torch.Tensor]], domains: Sequence[str], step: int
) -> dict[str, Any]:
    """The eval row: token-weighted val loss, overall and per dataset, summed over all ranks (so every rank decides
    alike), and the L2 norm of the trainable weights. A loss that is not finite is flagged, and rank 0 warns."""
    model, device = engine.model, engine.device
    model.eval()
    sums = [0.0] * len(domains)
    counts = [0.0] * len(domains)
    with torch.no_grad():
        for batch in batches:
            inputs = _on_device(batch, device)
            labels = inputs["labels"]
            logits = model(**{**model_inputs(inputs), "labels": None}).logits.float()
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(labels.shape[0], -1)
            supervised = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            for row, domain in enumerate(batch["domain"].tolist()):
                sums[domain] += token_loss[row].sum().item()
                counts[domain] += supervised[row].item()
    model.train()
    totals = allreduce_sum(sums + counts, device)
    sums, counts = totals[: len(domains)], totals[len(domains) :]
    metrics: dict[str, Any] = {"eval_loss": sum(sums) / max(sum(counts), 1.0)}
    if len(domains) > 1:
        metrics.update({f"eval_loss/{name}": s / c for name, s, c in zip(domains, sums, counts) if c})
    metrics["weight_norm"] = weight_norm(engine)
    if not math.isfinite(metrics["eval_loss"]):
        metrics["eval_loss_not_finite"] = True
        if engine.rank == 0:
            logger.warning(
                "step %d: the eval loss is %s; early stopping counts it as an evaluation without improvement",
                step,
                metrics["eval_loss"],
            )
    return metrics


def improved(eval_loss: float, best: float, min_delta: float) -> bool:
    """Whether an evaluation is a new best for early stopping: finite, and below ``best`` by more than ``min_delta``.
    A NaN or infinite loss never is (NaN compares false anyway, but -inf would beat everything)."""
    return math.isfinite(eval_loss) and eval_loss < best - min_delta


def record_evaluation(
    state: LoopState, eval_loss: float, settings: TrainLoopSpec, engine: TrainEngine, last: bool
) -> None:
    """Early stopping's account of an evaluation: a new best resets the patience count and, with early stopping on,
    keeps a CPU copy of its weights to export (not at the last step, whose weights go out anyway); anything else is
    one more evaluation without improvement, and ``patience`` of those stop the run."""
    if improved(eval_loss, state.best_eval_loss, settings.early_stopping_min_delta):
        state.best_eval_loss, state.best_step, state.evals_without_improvement = eval_loss, state.step, 0
        if settings.early_stopping_patience:
            state.best_weights = None if last else snapshot(engine)
    else:
        state.evals_without_improvement += 1
    patience = settings.early_stopping_patience
    state.stopped_early = bool(patience) and state.evals_without_improvement >= patience


# ---------------------------------------------------------------- non-finite steps


class NonFiniteLossError(RuntimeError):
    """A step's training loss or gradient norm is NaN or infinite: the run stops and exports nothing."""


def non_finite_message(step: int, loss_sum: float, grad_norm: float) -> str | None:
    """Why ``step`` must stop the run, or None when its loss (summed over ranks) and gradient norm are finite."""
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
        return None
    return (
        f"step {step}: the training loss (summed over ranks: {loss_sum}) or the gradient norm ({grad_norm}) is not "
        "finite. The run stops here and exports no model; checkpoints of earlier steps are kept. Lower train.lr "
        "or raise train.warmup_steps, or look for broken rows in the training data"
    )


def stop_if_not_finite(step: int, step_loss: float, grad_norm: float | None, world: int, device) -> None:
    """Raise `NonFiniteLossError` on every rank alike. The values are all-reduced first (a sum is finite only if every
    rank's term is): a rank that stopped alone would leave the others waiting in their next collective."""
    loss_sum, norm_sum = allreduce_sum([step_loss, float(grad_norm or 0.0)], device)
    message = non_finite_message(step, loss_sum, norm_sum / world)  # the norm is global: the same on every rank
    if message is not None:
        raise NonFiniteLossError(message)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(
    engine: TrainEngine, state: LoopState, directory: str, lora: bool, with_best_weights: bool = True
) -> None:
    """This rank's part of a checkpoint, written into ``directory``: its DeepSpeed shards (tag ``step<N>``) with the
    loop state, and its copy of the best evaluation's weights when it keeps one, so that a run resumed after training
    went past that evaluation still exports them; rank 0 adds loop_state.json. Every rank must call it.

    LoRA runs leave the frozen base weights out: they are the same in every checkpoint and rebuilt at start."""
    from safetensors.torch import save_file

    engine.model.save_checkpoint(
        directory, tag=f"step{state.step}", client_state={"loop_state": state.to_json()}, exclude_frozen_parameters=lora
    )
    if with_best_weights and state.best_weights is not None:
        weights = {str(i): t.contiguous() for i, t in enumerate(state.best_weights)}
        save_file(weights, os.path.join(directory, BEST_WEIGHTS_FILE.format(rank=engine.rank)))
    if engine.rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state.to_json(), f)


def load_checkpoint(engine: TrainEngine, directory: str) -> LoopState:
    """The loop state of the checkpoint in ``directory``, its DeepSpeed state loaded into ``engine``, with this rank's
    copy of the best weights when the checkpoint holds one."""
    from safetensors.torch import load_file

    _, client_state = engine.model.load_checkpoint(directory, load_module_strict=False)
    state = LoopState.from_json(client_state["loop_state"])
    path = os.path.join(directory, BEST_WEIGHTS_FILE.format(rank=engine.rank))
    if os.path.exists(path):
        saved = load_file(path)
        state.best_weights = [saved[str(i)] for i in range(len(saved))]
    return state
