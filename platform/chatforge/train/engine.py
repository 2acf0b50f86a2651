"""The DeepSpeed engine a run trains: process-group setup, the engine built from a spec, its weights, the export.

No Ray here: the Ray Train worker (`chatforge.train.worker`), the torchrun baseline of the training-overhead
benchmark and the unit tests all build their engine with `build_engine` after `init_distributed`, and export with
`export_model`.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
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

MODEL_DIR = "model"  # inside the final checkpoint: the exported Hugging Face model
ADAPTER_DIR = "adapter"  # LoRA runs: the adapter alone


# ---------------------------------------------------------------- the process group


def init_distributed(use_gpu: bool) -> None:
    """Join the process group the launcher describes (Ray Train or torchrun set its environment): nccl or gloo."""
    import deepspeed

    from chatforge.compat import skip_deepspeed_shm_op

    if not use_gpu and shutil.which("c++") is None:
        skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over all ranks (one all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- the engine


@dataclass
class TrainEngine:
    """A DeepSpeed engine and what the loop needs to know about it.

    ``model`` is the ``deepspeed.DeepSpeedEngine``: ``model(**inputs)``, ``model.backward(loss)`` and
    ``model.step()``, which accumulates gradients, clips them, and steps AdamW and ``scheduler`` at the accumulation
    boundary.
    """

    model: Any
    scheduler: Any
    zero_stage: int
    device: torch.device
    rank: int = 0
    world: int = 1
    trainable_params: int = 0
    total_params: int = 0


def _with_batch_sizes(ds_config: dict[str, Any], world: int) -> dict[str, Any]:
    """HfDeepSpeedConfig wants the global batch size spelled out (deepspeed.initialize derives it)."""
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    return {**ds_config, "train_batch_size": micro * accum * world}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings' 1-D params."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(
    spec: Spec, tokenizer, rank: int = 0, world: int = 1, trainable_token_ids: Sequence[int] = ()
) -> TrainEngine:
    """The model of ``spec`` (the same initial weights on every rank), with LoRA if asked, in a DeepSpeed engine
    with AdamW and the spec's LR schedule. The process group must be up (`init_distributed`)."""
    import deepspeed

    loop, use_gpu = spec.train, spec.scaling.use_gpu
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(loop.seed)
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
        model = apply_lora(model, spec.lora, trainable_token_ids)
    trainable, total = count_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, loop.weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, loop=loop)),
    )
    return TrainEngine(engine, scheduler, spec.deepspeed.zero_stage, device, rank, world, trainable, total)


# ---------------------------------------------------------------- weights


def gradient_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of the gradients (before clipping)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _rank_weights(engine: TrainEngine) -> list[torch.Tensor]:
    """This rank's storage of the trainable weights: whole parameters, or under ZeRO-3 its (zero-padded) partitions."""
    params = [p for p in engine.model.module.parameters() if p.requires_grad]
    return [p.ds_tensor for p in params] if engine.zero_stage == 3 else [p.data for p in params]


def _exported_weights(engine: TrainEngine) -> list[torch.Tensor]:
    """What an export reads on this rank: ``_rank_weights`` plus, under ZeRO-3, the whole tensors of the small
    parameters it keeps unpartitioned on every rank (``ds_persist``; a gather reads those, not their partitions)."""
    module = engine.model.module
    persistent = [p.data for p in module.parameters() if p.requires_grad and getattr(p, "ds_persist", False)]
    return _rank_weights(engine) + (persistent if engine.zero_stage == 3 else [])


def weight_norm(engine: TrainEngine) -> float:
    """L2 norm of the trainable weights (ZeRO-3: the ranks' partitions summed across ranks)."""
    squares = sum(float(t.detach().double().pow(2).sum()) for t in _rank_weights(engine))
    return math.sqrt(allreduce_sum([squares], engine.device)[0] if engine.zero_stage == 3 else squares)


def snapshot(engine: TrainEngine) -> list[torch.Tensor] | None:
    """A CPU copy of the trainable weights this rank exports from: rank 0 under ZeRO 0-2 (every rank holds them
    whole), each rank's partitions under ZeRO-3 (the export gathers them). For LoRA, only the adapters."""
    if engine.zero_stage != 3 and engine.rank != 0:
        return None
    return [t.detach().to("cpu", copy=True) for t in _exported_weights(engine)]


def restore_snapshot(engine: TrainEngine, saved: list[torch.Tensor] | None) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for target, value in zip(_exported_weights(engine), saved, strict=True):
            target.copy_(value.to(target.device))


# ---------------------------------------------------------------- export


def export_model(
    engine: TrainEngine, spec: Spec, tokenizer, best_weights: list[torch.Tensor] | None, directory: str
) -> None:
    """Gather the full weights (ZeRO-3 shards included) and write a Hugging Face model dir on rank 0 (safetensors):
    ``directory/model``, and for LoRA also the adapter alone in ``directory/adapter``. Every rank must call it.

    ``best_weights``: the snapshot of the best evaluation's weights, put back first (call this after the last
    DeepSpeed checkpoint was written, so that checkpoint stays the consistent state of the last step)."""
    import deepspeed

    restore_snapshot(engine, best_weights)
    module = engine.model.module
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if engine.zero_stage == 3 else nullcontext()
    with gather:
        if engine.rank != 0:
            return
        if spec.method == "lora":
            module.save_pretrained(os.path.join(directory, ADAPTER_DIR))
            module = module.merge_and_unload()
        module.save_pretrained(os.path.join(directory, MODEL_DIR))  # safetensors; inside the gather under ZeRO-3
        tokenizer.save_pretrained(os.path.join(directory, MODEL_DIR))
