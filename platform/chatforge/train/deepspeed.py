"""The DeepSpeed config a spec asks for, the LR schedule, and ZeRO memory arithmetic.

Pure functions: the loop passes `deepspeed_config(...)` to `deepspeed.initialize`, and the docs' memory table comes
from `zero_memory_per_worker`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from chatforge.config import DeepSpeedSpec, TrainLoopSpec


def deepspeed_config(ds: DeepSpeedSpec, loop: TrainLoopSpec, use_gpu: bool, bf16: bool) -> dict[str, Any]:
    """A DeepSpeed config dict: ZeRO stage and offload, micro-batch and accumulation, clipping, AdamW, precision.

    On CPU the optimizer is torch's AdamW (``torch_adam``), so DeepSpeed compiles no fused op; with optimizer offload
    on CPU, ``zero_force_ds_cpu_optimizer: false`` lets that same optimizer run on the offloaded fp32 state.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # Gather the full weights at save time too, so export can also use save_16bit_model on huge models.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params: dict[str, Any] = {
        "lr": loop.lr,
        "betas": list(loop.betas),
        "eps": 1e-8,
        "weight_decay": loop.weight_decay,
    }
    if not use_gpu:
        optimizer_params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.grad_accum,
        "gradient_clipping": loop.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": sys.maxsize,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer and not use_gpu:
        config["zero_force_ds_cpu_optimizer"] = False
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_multiplier(step: int, loop: TrainLoopSpec) -> float:
    """The factor on ``loop.lr`` at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if loop.warmup_steps and step < loop.warmup_steps:
        return (step + 1) / loop.warmup_steps
    if loop.schedule == "constant":
        return 1.0
    span = max(1, loop.max_steps - loop.warmup_steps)
    progress = min(1.0, (step - loop.warmup_steps) / span)
    floor = loop.min_lr_ratio
    if loop.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def zero_memory_per_worker(params: int, trainable: int, stage: int, workers: int, bf16: bool) -> dict[str, float]:
    """Bytes per worker for weights, gradients and AdamW state under ZeRO ``stage`` (the ZeRO paper's arithmetic).

    Mixed precision keeps 2-byte weights and gradients plus fp32 master weights, momentum and variance (12 bytes per
    trainable parameter); fp32 keeps 4-byte weights and gradients and 8 bytes of Adam state. Stage 1 partitions the
    optimizer state, 2 also the gradients, 3 also the weights.
    """
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = 12 if bf16 else 8
    weights = params * weight_bytes
    grads = trainable * weight_bytes
    optimizer = trainable * optimizer_bytes
    if stage >= 1:
        optimizer /= workers
    if stage >= 2:
        grads /= workers
    if stage >= 3:
        weights /= workers
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "total": weights + grads + optimizer}
