"""The plain `torchrun` + DeepSpeed side of `benchmarks/train_overhead.py`: chatforge's training loop without Ray.

    torchrun --standalone --nproc_per_node 2 benchmarks/_torchrun_baseline.py \
        --spec SPEC.yaml --data CURATED/data --tokenizer RAY_OUTPUT/model --warmup 10 --result OUT.json

Not meant to be run by hand: `train_overhead.py` writes the spec, runs chatforge on it first (whose exported model
dir holds the tokenizer chatforge trained), then starts this script with the same spec, so both runs use the same
`ModelSpec`, `TrainLoopSpec` and `DeepSpeedSpec`. Every step is chatforge's own: `TokenizeSamples`/`PackRows`
(rows), `build_engine` (model, DeepSpeed config, LR schedule), `run_steps` (the loop each Ray Train worker runs, with
its non-finite check, logging and evaluation), `save_checkpoint` and `export_model`; what Ray adds is left out (no
`get_dataset_shard`, no `ray.train.report`, no Ray checkpoint). Rank 0 writes its result as JSON to ``--result``
(DeepSpeed logs to stdout, so stdout is not a reliable channel).

``--memory-stage S`` measures instead of timing: one micro-step of the same model under ZeRO stage S on random
tokens, then the bytes each rank holds in parameters, gradients, optimizer state and fp32 master weights.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from chatforge.config import Spec, load_spec
from chatforge.train.data import PackRows, TokenizeSamples
from chatforge.train.engine import allreduce_sum, build_engine, export_model, init_distributed
from chatforge.train.loop import LoopState, micro_batches, run_steps, save_checkpoint
from chatforge.train.metrics import MetricsHistory
from chatforge.train.tokenize import PAD_SEQUENCE_ID, TENSOR_KEYS, model_inputs

TOKENIZE_BATCH = 256  # conversations per TokenizeSamples call, as prepare_datasets' map_batches
PACK_BATCH = 1024  # samples per PackRows call, as prepare_datasets' map_batches


# ---------------------------------------------------------------- data


def packed_rows(
    directory: str, spec: Spec, tokenizer, rank: int, world: int, limit: int | None = None
) -> dict[str, np.ndarray]:
    """This rank's share of a split (conversations ``rank::world``), tokenized and packed as chatforge does;
    ``limit`` keeps the first usable samples only (chatforge's val set: ``eval_batches x batch_size`` of them)."""
    table = pq.read_table(directory, columns=["messages"])
    mine = table.take(pa.array(range(rank, len(table), world), pa.int64()))
    tokenize = TokenizeSamples(tokenizer, spec.model.max_length, tag=None, domain=0)
    samples = pa.concat_tables(
        [tokenize(mine.slice(start, TOKENIZE_BATCH)) for start in range(0, len(mine), TOKENIZE_BATCH)]
    )
    samples = samples.filter(pc.greater(samples["supervised"], 0))  # skipped samples, as in prepare_datasets
    if limit is not None:
        samples = samples.slice(0, limit)
    pack = PackRows(spec.model.max_length, tokenizer.pad_token_id, spec.train.packing)
    parts = [pack(samples.slice(start, PACK_BATCH)) for start in range(0, len(samples), PACK_BATCH)]
    return {key: np.concatenate([part[key] for part in parts]) for key in (*TENSOR_KEYS, "domain")}


def batch_at(rows: dict[str, np.ndarray], start: int, batch_size: int) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value[start : start + batch_size]).long() for key, value in rows.items()}


def epoch_of(rows: dict[str, np.ndarray], batch_size: int):
    """One pass over the rows in full micro-batches, in order (Ray's ``iter_torch_batches(drop_last=True)``)."""
    return (
        batch_at(rows, start, batch_size) for start in range(0, len(rows["input_ids"]) - batch_size + 1, batch_size)
    )


class TimedHistory(MetricsHistory):
    """The loop's rows, each log row with the wall time and steps of its window (``step_s`` comes from them)."""

    def __init__(self) -> None:
        super().__init__()
        self.mark = (time.perf_counter(), 0)

    def log(self, step: int, metrics: dict) -> None:
        if "tokens_per_s" in metrics:
            now = time.perf_counter()
            (then, then_step), self.mark = self.mark, (now, step)
            metrics = {**metrics, "window_s": now - then, "window_steps": step - then_step}
        super().log(step, metrics)


# ---------------------------------------------------------------- timing run


def timed_run(args, spec: Spec, tokenizer, rank: int, world: int, started: float) -> dict | None:
    loop = spec.train
    device = torch.device("cpu")
    train_rows = packed_rows(os.path.join(args.data, "train"), spec, tokenizer, rank, world)
    # every rank: the whole (cut) val set, in batches, the last one possibly short, as get_dataset_shard("val") gives it
    val_rows = packed_rows(os.path.join(args.data, "val"), spec, tokenizer, 0, 1, loop.eval_batches * loop.batch_size)
    val_batches = [
        batch_at(val_rows, i, loop.batch_size) for i in range(0, len(val_rows["input_ids"]), loop.batch_size)
    ]
    real, total = allreduce_sum(
        [float((train_rows["sequence_ids"] != PAD_SEQUENCE_ID).sum()), float(train_rows["sequence_ids"].size)], device
    )

    engine = build_engine(spec, tokenizer, rank, world)
    state = LoopState()
    batches = micro_batches(partial(epoch_of, train_rows, loop.batch_size), state, loop.batch_size)
    setup_s = time.perf_counter() - started

    # The loop each Ray Train worker runs; the spec evaluates once, at the last step.
    history = TimedHistory()
    train_started = time.perf_counter()
    run_steps(engine, batches, state, loop, val_batches, history)
    train_s = time.perf_counter() - train_started

    # The end of a chatforge run: the final checkpoint, and the Hugging Face model exported beside it.
    with tempfile.TemporaryDirectory(prefix=f"baseline-ckpt-r{rank}-") as tmp:
        save_checkpoint(engine, state, tmp, lora=False, with_best_weights=False)
        export_model(engine, spec, tokenizer, state.best_weights, args.output or tmp)
    torch.distributed.barrier()
    if rank != 0:
        return None
    logged = [row for row in history.rows if "tokens_per_s" in row]
    steady = [row for row in logged if row["step"] > args.warmup] or logged
    return {
        "tokens_per_s": sum(row["tokens_per_s"] for row in steady) / len(steady),
        "step_s": sum(row["window_s"] for row in steady) / sum(row["window_steps"] for row in steady),
        "packing_efficiency": round(real / total, 4),
        "train_rows": int(total // spec.model.max_length),
        "total_params": engine.total_params,
        "trainable_params": engine.trainable_params,
        "setup_s": round(setup_s, 3),
        "train_s": round(train_s, 3),
        "eval_loss": history.last("eval_loss")["eval_loss"],
        "history": logged,
    }


# ---------------------------------------------------------------- memory run


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def measured_memory(engine, stage: int, grads: int) -> dict[str, int]:
    """Bytes this rank holds: its parameter storage (ZeRO-3: ``ds_tensor`` partitions plus parameters small enough
    to stay whole), the gradients measured after backward, the optimizer's state tensors, and fp32 master weights
    (the optimizer's own parameter tensors when they are not the model's storage)."""
    module_params = 0
    module_storages = set()
    for param in engine.module.parameters():
        for tensor in (param.data, getattr(param, "ds_tensor", None)):
            if tensor is not None and tensor.numel():
                module_params += _bytes(tensor)
                module_storages.add(_storage(tensor))
    optimizer = engine.basic_optimizer  # the torch AdamW inside any ZeRO wrapper
    state = sum(_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    master = sum(
        _bytes(p) for group in optimizer.param_groups for p in group["params"] if _storage(p) not in module_storages
    )
    return {
        "parameters": module_params,
        "gradients": grads,
        "optimizer_state": state,
        "master_weights": master,
        "total": module_params + grads + state + master,
    }


def memory_run(args, spec: Spec, tokenizer, rank: int, world: int) -> dict:
    stage = args.memory_stage
    ds = spec.deepspeed.model_copy(update={"zero_stage": stage, "offload_optimizer": False, "offload_params": False})
    built = build_engine(spec.model_copy(update={"deepspeed": ds}), tokenizer, rank, world)
    engine, trainable, params = built.model, built.trainable_params, built.total_params
    rows, length = spec.train.batch_size, spec.model.max_length
    input_ids = torch.randint(0, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(rank))
    batch = {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "position_ids": torch.arange(length).expand(rows, length),
        "sequence_ids": torch.zeros(rows, length, dtype=torch.long),
    }
    engine.train()
    engine.backward(engine(**model_inputs(batch)).loss)
    if stage == 3:  # reduced straight into this rank's flat partition during backward
        buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        grads = _bytes(buffer) if buffer is not None else 0
    else:  # stage 0: a full .grad on every parameter
        grads = sum(_bytes(p.grad) for p in engine.module.parameters() if p.grad is not None)
    engine.step()  # torch AdamW creates its state on the first step
    return {
        "stage": stage,
        "rank": rank,
        "total_params": params,
        "trainable_params": trainable,
        "measured_bytes": measured_memory(engine, stage, grads),
        "process_rss_bytes": psutil.Process().memory_info().rss,
    }


# ---------------------------------------------------------------- main


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="the spec chatforge ran")
    parser.add_argument("--tokenizer", required=True, help="a dir holding chatforge's saved tokenizer")
    parser.add_argument("--data", help="curated data/ dir (train/ and val/); not needed with --memory-stage")
    parser.add_argument("--warmup", type=int, default=10, help="optimizer steps left out of the steady state")
    parser.add_argument("--output", help="where to export the model (default: a temporary dir)")
    parser.add_argument("--memory-stage", type=int, choices=[0, 3], help="measure memory under this stage")
    parser.add_argument("--result", required=True, help="rank 0 writes its JSON result here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    spec = load_spec(args.spec)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))  # as the Ray worker does
    init_distributed(use_gpu=False)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    if args.memory_stage is not None:
        mine = memory_run(args, spec, tokenizer, rank, world)
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
        result = {"per_rank": everyone} if rank == 0 else None
    else:
        if not args.data:
            parser.error("--data is required for a timing run")
        result = timed_run(args, spec, tokenizer, rank, world, started)
    if result is not None:
        result["world_size"] = world
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
