"""The training loop each Ray Train worker runs: step, accumulate, clip, schedule, log, evaluate, checkpoint, export.

Read top to bottom: `train_loop_per_worker` builds the model and the DeepSpeed engine, resumes from Ray's last
checkpoint if there is one, then runs optimizer steps until ``max_steps`` or early stopping, and finally gathers
the full weights into a Hugging Face model directory that goes out with the last checkpoint. A step whose loss or
gradient norm is not finite stops the run on every rank, before anything of it is checkpointed or exported.
DeepSpeed does accumulation (``gradient_accumulation_steps``), clipping and the LR scheduler step inside
``engine.step()``; every rank takes the same number of micro-steps because Ray splits the train set equally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from chatforge.config import Spec
from chatforge.train.deepspeed import deepspeed_config, lr_multiplier
from chatforge.train.model import (
    apply_lora,
    build_model,
    count_parameters,
    enable_gradient_checkpointing,
    resolve_dtype,
)
from chatforge.train.tokenize import IGNORE_INDEX, PAD_SEQUENCE_ID, model_inputs

MODEL_DIR = "model"  # inside the final checkpoint: the exported Hugging Face model
ADAPTER_DIR = "adapter"  # LoRA runs: the adapter alone
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "loop_state.json"
BEST_WEIGHTS_FILE = "best_weights.rank{rank}.safetensors"  # in a checkpoint: the rank's snapshot of the best eval
TENSOR_KEYS = ("input_ids", "labels", "position_ids", "sequence_ids")

logger = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per GPU, for MFU (by device-name substring; unknown devices report no MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass
class LoopState:
    """What a resume needs beyond DeepSpeed's own state (weights, optimizer, scheduler)."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # data position: micro-batches of the current epoch already consumed
    best_eval_loss: float = math.inf
    best_step: int = 0  # the step of best_eval_loss (its weights are what is exported)
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _init_distributed(use_gpu: bool) -> None:
    import sys

    import deepspeed

    if not use_gpu and shutil.which("c++") is None:
        # On CPU DeepSpeed JIT-builds a shared-memory comm op and fails hard without a compiler; without it the
        # collectives are plain gloo (same results). RAY-NOTES: patch the module attribute, found in sys.modules.
        module = sys.modules.get("deepspeed.comm.torch")
        if module is not None and hasattr(module, "build_shm_op"):
            module.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _with_batch_sizes(ds_config: dict[str, Any], world: int) -> dict[str, Any]:
    """HfDeepSpeedConfig wants the global batch size spelled out (deepspeed.initialize derives it)."""
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    return {**ds_config, "train_batch_size": micro * accum * world}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings' 1-D params."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(shard, batch_size: int, state: LoopState) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches forever, epoch after epoch, resuming at the saved data position."""
    skip = state.micro_batches_in_epoch
    while True:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.long):
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


def _allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def evaluate(engine, batches: list[dict[str, torch.Tensor]], domains: list[str], device) -> dict[str, float]:
    """Token-weighted val loss, overall and per source, averaged over all ranks (so every rank decides alike)."""
    engine.eval()
    sums = [0.0] * len(domains)
    counts = [0.0] * len(domains)
    with torch.no_grad():
        for batch in batches:
            inputs = _on_device(batch, device)
            labels = inputs["labels"]
            logits = engine(**{**model_inputs(inputs), "labels": None}).logits.float()
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
    engine.train()
    totals = _allreduce_sum(sums + counts, device)
    sums, counts = totals[: len(domains)], totals[len(domains) :]
    metrics = {"eval_loss": sum(sums) / max(sum(counts), 1.0)}
    if len(domains) > 1:
        metrics.update({f"eval_loss/{name}": s / c for name, s, c in zip(domains, sums, counts) if c})
    return metrics


def _grad_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of the gradients (before clipping)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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


def _stop_if_not_finite(step: int, step_loss: float, grad_norm: float | None, world: int, device) -> None:
    """Raise `NonFiniteLossError` on every rank alike. The values are all-reduced first (a sum is finite only if every
    rank's term is): a rank that stopped alone would leave the others waiting in their next collective."""
    loss_sum, norm_sum = _allreduce_sum([step_loss, float(grad_norm or 0.0)], device)
    message = non_finite_message(step, loss_sum, norm_sum / world)  # the norm is global: the same on every rank
    if message is not None:
        raise NonFiniteLossError(message)


def improved(eval_loss: float, best: float, min_delta: float) -> bool:
    """Whether an evaluation is a new best for early stopping: finite, and below ``best`` by more than ``min_delta``.
    A NaN or infinite loss never is (NaN compares false anyway, but -inf would beat everything)."""
    return math.isfinite(eval_loss) and eval_loss < best - min_delta


def _rank_weights(engine, stage: int) -> list[torch.Tensor]:
    """This rank's storage of the trainable weights: whole parameters, or under ZeRO-3 its (zero-padded) partitions."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return [p.ds_tensor for p in params] if stage == 3 else [p.data for p in params]


def _trainable(engine, stage: int) -> list[torch.Tensor]:
    """What an export reads on this rank: ``_rank_weights`` plus, under ZeRO-3, the whole tensors of the small
    parameters it keeps unpartitioned on every rank (``ds_persist``; a gather reads those, not their partitions)."""
    persistent = [p.data for p in engine.module.parameters() if p.requires_grad and getattr(p, "ds_persist", False)]
    return _rank_weights(engine, stage) + (persistent if stage == 3 else [])


def weight_norm(engine, stage: int, device) -> float:
    """L2 norm of the trainable weights (ZeRO-3: the ranks' partitions summed across ranks)."""
    squares = sum(float(t.detach().double().pow(2).sum()) for t in _rank_weights(engine, stage))
    return math.sqrt(_allreduce_sum([squares], device)[0] if stage == 3 else squares)


def snapshot(engine, stage: int, rank: int) -> list[torch.Tensor] | None:
    """A CPU copy of the trainable weights this rank exports from: rank 0 under ZeRO 0-2 (every rank holds them
    whole), each rank's partitions under ZeRO-3 (the export gathers them). For LoRA, only the adapters."""
    if stage != 3 and rank != 0:
        return None
    return [t.detach().to("cpu", copy=True) for t in _trainable(engine, stage)]


def restore_snapshot(engine, stage: int, saved: list[torch.Tensor] | None) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for target, value in zip(_trainable(engine, stage), saved, strict=True):
            target.copy_(value.to(target.device))


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


def _save(engine, state: LoopState, rank: int, metrics: dict[str, Any], lora: bool, best=None, export=None) -> None:
    """Every rank writes its DeepSpeed shards to its own dir; Ray merges the ranks' dirs into one checkpoint.

    ``best``: this rank's snapshot of the best evaluation's weights (kept while early stopping is on); it goes into
    the checkpoint too, so that a run resumed from it after training went past that evaluation still exports them."""
    import ray.train
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp(prefix=f"chatforge-ckpt-r{rank}-")
    try:
        # LoRA: the frozen base weights are the same in every checkpoint (and rebuilt at start), so leave them out
        engine.save_checkpoint(
            tmp, tag=f"step{state.step}", client_state={"loop_state": asdict(state)}, exclude_frozen_parameters=lora
        )
        if best is not None:
            save_file({str(i): t.contiguous() for i, t in enumerate(best)}, os.path.join(tmp, _best_file(rank)))
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            with open(os.path.join(tmp, METRICS_FILE), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in state.history)
        if export is not None:
            export(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _best_file(rank: int) -> str:
    return BEST_WEIGHTS_FILE.format(rank=rank)


def _restore(engine, state: LoopState, rank: int) -> tuple[LoopState, list[torch.Tensor] | None]:
    """The loop state of Ray's last checkpoint (DeepSpeed's state loaded into ``engine``) and this rank's snapshot
    of the best weights if the checkpoint holds one; ``state`` unchanged and None without a checkpoint."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state, None
    best = None
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory, load_module_strict=False)
        path = os.path.join(directory, _best_file(rank))
        if os.path.exists(path):
            saved = load_file(path)
            best = [saved[str(i)] for i in range(len(saved))]
    restored = LoopState(**client_state["loop_state"])
    restored.history.append({"step": restored.step, "event": "resumed"})
    return restored, best


def _export(engine, spec: Spec, tokenizer, rank: int, stage: int, best, directory: str) -> None:
    """Gather the full weights (ZeRO-3 shards included) and write a Hugging Face model dir on rank 0 (safetensors).

    ``best``: the snapshot of the best evaluation's weights, put back first (after the last DeepSpeed checkpoint
    was written, so that checkpoint stays the consistent state of the last step)."""
    import deepspeed

    restore_snapshot(engine, stage, best)
    module = engine.module
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if stage == 3 else nullcontext()
    with gather:
        if rank != 0:
            return
        if spec.method == "lora":
            module.save_pretrained(os.path.join(directory, ADAPTER_DIR))
            module = module.merge_and_unload()
        module.save_pretrained(os.path.join(directory, MODEL_DIR))  # safetensors; inside the gather under ZeRO-3
        tokenizer.save_pretrained(os.path.join(directory, MODEL_DIR))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.data
    import ray.train

    spec = Spec.model_validate(config["spec"])
    tokenizer = config["tokenizer"]
    # the driver shows training progress; Ray Data's bars for each worker's shard reads would only interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False
    loop, use_gpu = spec.train, spec.scaling.use_gpu
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _init_distributed(use_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    torch.manual_seed(loop.seed)  # the same initial weights on every rank
    dtype = resolve_dtype(spec.model.dtype) if use_gpu else torch.float32
    ds_config = deepspeed_config(spec.deepspeed, loop, use_gpu=use_gpu, bf16=dtype == torch.bfloat16)
    zero3_loading = None
    if spec.deepspeed.zero_stage == 3 and not spec.model.from_scratch:
        # Kept alive through from_pretrained: it makes transformers load straight into ZeRO-3 partitions
        # (deepspeed.zero.Init), so no rank ever holds the whole model.
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(_with_batch_sizes(ds_config, world))
    model = build_model(spec.model, tokenizer, torch_dtype=dtype)
    del zero3_loading
    if loop.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if spec.method == "lora":
        model = apply_lora(model, spec.lora, config.get("trainable_token_ids", ()))
    trainable, total = count_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, loop.weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, loop=loop)),
    )
    state, best_weights = _restore(engine, LoopState(), rank)  # best_weights: see the early-stopping branch
    # The val set was cut to eval_batches per dataset when it was prepared: hold it, the same batches every eval.
    val_shard = ray.train.get_dataset_shard("val")
    val_batches = list(val_shard.iter_torch_batches(batch_size=loop.batch_size, dtypes=torch.long))
    micro_batches = _batches(ray.train.get_dataset_shard("train"), loop.batch_size, state)
    fault_at = config.get("fault_at_step")
    resumed = state.step > 0

    stage = spec.deepspeed.zero_stage
    stage0_grad_norm = stage == 0
    last_grad_norm = None
    engine.train()
    window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    while state.step < loop.max_steps and not state.stopped_early:
        step_loss = 0.0
        for _ in range(loop.grad_accum):
            batch = _on_device(next(micro_batches), device)
            loss = engine(**model_inputs(batch)).loss
            engine.backward(loss)
            if stage0_grad_norm and engine.is_gradient_accumulation_boundary():
                last_grad_norm = _grad_norm(engine.module)  # ZeRO-0 does not report one; grads are reduced here
            engine.step()  # DeepSpeed steps optimizer, clipping and scheduler at the accumulation boundary
            step_loss += loss.item()
            window_micro += 1
            window_tokens += int((batch["sequence_ids"] != PAD_SEQUENCE_ID).sum())
        window_loss += step_loss
        state.step += 1
        if fault_at is not None and state.step == fault_at and not resumed and rank == world - 1:
            # Fault injection for resume tests: this worker process dies mid-run. The pause first lets Ray collect the
            # last checkpoint report, which a worker that dies at once can lose (RAY-NOTES) - a test of resume must
            # not depend on that race.
            time.sleep(2.0)
            os._exit(1)
        grad_norm = last_grad_norm if stage0_grad_norm else engine.get_global_grad_norm()
        _stop_if_not_finite(state.step, step_loss, grad_norm, world, device)

        metrics: dict[str, Any] = {}
        last = state.step == loop.max_steps
        if state.step % loop.log_every == 0 or last:
            loss_sum, micro, tokens = _allreduce_sum([window_loss, window_micro, window_tokens], device)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": loss_sum / micro,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens / elapsed,
            }
            if (mfu := _mfu(metrics["tokens_per_s"], model_flops_per_token(trainable, total), world)) is not None:
                metrics["mfu"] = mfu
            state.history.append(metrics)
            window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if state.step % loop.eval_every == 0 or last:
            evaluation = {"step": state.step, **evaluate(engine, val_batches, config["domains"], device)}
            evaluation["weight_norm"] = weight_norm(engine, stage, device)
            if not math.isfinite(evaluation["eval_loss"]):
                evaluation["eval_loss_not_finite"] = True  # all-reduced: every rank sees it
                if rank == 0:
                    logger.warning(
                        "step %d: the eval loss is %s; early stopping counts it as an evaluation without improvement",
                        state.step,
                        evaluation["eval_loss"],
                    )
            state.history.append(evaluation)
            metrics = {**metrics, **evaluation}
            if improved(evaluation["eval_loss"], state.best_eval_loss, loop.early_stopping_min_delta):
                state.best_eval_loss, state.best_step, state.evals_without_improvement = (
                    evaluation["eval_loss"],
                    state.step,
                    0,
                )
                if loop.early_stopping_patience:  # the last step's weights go out anyway
                    best_weights = None if last else snapshot(engine, stage, rank)
            else:
                state.evals_without_improvement += 1
            patience = loop.early_stopping_patience
            state.stopped_early = bool(patience) and state.evals_without_improvement >= patience
        if state.stopped_early or last:
            break
        if state.step % loop.checkpoint_every == 0:
            _save(engine, state, rank, metrics or {"step": state.step}, lora=spec.method == "lora", best=best_weights)
        elif metrics:
            ray.train.report(metrics)

    # The best evaluation's weights go out when early stopping kept a snapshot of them (training went past them; a
    # resumed run has it back from the checkpoint).
    exported_step = state.best_step if best_weights is not None else state.step
    last_log = next(row for row in reversed(state.history) if "loss" in row)
    last_eval = next(row for row in reversed(state.history) if "eval_loss" in row)
    final = {
        **last_log,
        **last_eval,
        "step": state.step,
        "stopped_early": state.stopped_early,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "exported_step": exported_step,
        "trainable_params": trainable,
        "total_params": total,
    }
    _save(
        engine,
        state,
        rank,
        final,
        lora=spec.method == "lora",
        export=partial(_export, engine, spec, tokenizer, rank, stage, best_weights),
    )
