"""`chatforge train`: curated data -> tokenized, packed Ray Datasets -> a Ray Train `TorchTrainer` -> OUTPUT/.

OUTPUT/model/          Hugging Face model dir (safetensors, config, tokenizer with its chat template)
OUTPUT/adapter/        LoRA runs: the adapter alone
OUTPUT/checkpoints/    Ray Train checkpoints (DeepSpeed shards of every rank)
OUTPUT/metrics.jsonl   one JSON object per logged step (loss, lr, grad_norm, tokens_per_s) and per eval
OUTPUT/training.json   resolved config, data fingerprints, data and final metrics, chatforge version
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import chatforge
from chatforge.config import Spec, TrainDataSpec, resolved
from chatforge.train.loop import ADAPTER_DIR, METRICS_FILE, MODEL_DIR, TENSOR_KEYS, train_loop_per_worker
from chatforge.train.model import load_tokenizer
from chatforge.train.pretrained import model_path
from chatforge.train.progress import follow_reports
from chatforge.train.tokenize import make_rows, tokenize_conversation

TOKENIZER_TRAINING_CONVERSATIONS = 50_000


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the directory."""


@dataclass
class TrainingResult:
    output: str
    summary: dict[str, Any]


# ---------------------------------------------------------------- data


def resolve_data_dir(path: str) -> str:
    """A curation output's data/ dir (holding train/ and val/); the curation output dir itself is accepted too.

    The curation's manifest.json must be beside data/: a curation moves it into place last, so without it the data
    is not a finished curation's (and training.json could not name the data it came from).
    """
    directory = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(directory, "data", "train")):
        directory = os.path.join(directory, "data")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(directory, split)):
            raise TrainDataError(f"{path}: no {split}/ split here; pass a curation output's data/ directory")
    manifest = os.path.join(os.path.dirname(directory), "manifest.json")
    if not os.path.isfile(manifest):
        raise TrainDataError(
            f"{path}: no {manifest}, so this is not a finished curation's output (a curation run that failed or was "
            "stopped leaves none); run `chatforge curate` to completion and pass its data/ directory"
        )
    return directory


def data_fingerprint(data_dir: str) -> str | None:
    manifest = os.path.join(os.path.dirname(data_dir), "manifest.json")
    if not os.path.exists(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        return json.load(f).get("fingerprint")


def _combined_fingerprint(fingerprints: list[str | None]) -> str | None:
    """The training data's fingerprint: a curation's own for one dataset, a hash of them for several."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.blake2b(json.dumps(fingerprints).encode(), digest_size=16).hexdigest()


def with_tag(messages: list[dict[str, str]], tag: str | None) -> list[dict[str, str]]:
    """A dataset's domain tag as the system prompt (or at the head of the conversation's own)."""
    if tag is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"[{tag}] {messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": f"[{tag}]"}, *messages]


class TokenizeSamples:
    """Conversations -> one tokenized sample per row (variable length); ``supervised`` = 0 marks a skipped one."""

    def __init__(self, tokenizer, max_length: int, tag: str | None, domain: int):
        self.tokenizer, self.max_length, self.tag, self.domain = tokenizer, max_length, tag, domain

    def __call__(self, table: pa.Table) -> pa.Table:
        ids, labels, supervised = [], [], []
        for messages in table.column("messages").to_pylist():
            sample = tokenize_conversation(with_tag(messages, self.tag), self.tokenizer, self.max_length)
            ids.append(sample.input_ids if sample else [])
            labels.append(sample.labels if sample else [])
            supervised.append(sample.num_supervised if sample else 0)
        return pa.table(
            {
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "supervised": pa.array(supervised, pa.int32()),
                "domain": pa.array([self.domain] * len(ids), pa.int32()),
            }
        )


class PackRows:
    """Samples -> fixed-length rows (packed, or one padded sample per row) with position and sequence ids."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool):
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        from chatforge.train.tokenize import TokenizedSample

        samples = [
            TokenizedSample(i, lab)
            for i, lab in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())
        ]
        rows = list(make_rows(samples, self.seq_len, self.pad_id, self.packing))
        out = {
            key: np.stack([row[key] for row in rows]).astype(np.int32)
            if rows
            else np.zeros((0, self.seq_len), np.int32)
            for key in TENSOR_KEYS
        }
        out["domain"] = np.full(len(rows), table.column("domain")[0].as_py() if len(table) else 0, np.int32)
        out["n_tokens"] = (out["sequence_ids"] >= 0).sum(axis=1).astype(np.int64)
        return out


def _training_texts(data: list[str]):
    import ray.data

    ds = ray.data.read_parquet([os.path.join(d, "train") for d in data], columns=["messages"])
    for row in ds.limit(TOKENIZER_TRAINING_CONVERSATIONS).iter_rows():
        for message in row["messages"]:
            yield message["content"]


def prepare_datasets(spec: Spec, data: list[TrainDataSpec], data_dirs: list[str], tokenizer):
    """Tokenize and pack train and val of every dataset (mixed by weight), materialized once for all epochs."""
    import ray.data

    seq_len, pad_id = spec.model.max_length, tokenizer.pad_token_id
    samples = {"train": [], "val": []}
    for domain, (source, directory) in enumerate(zip(data, data_dirs)):
        for split in samples:
            ds = ray.data.read_parquet(os.path.join(directory, split), columns=["messages"])
            fn = TokenizeSamples(tokenizer, seq_len, source.tag, domain)
            samples[split].append(ds.map_batches(fn, batch_format="pyarrow", batch_size=256).materialize())
    counts = [ds.count() for ds in samples["train"]]
    if not any(counts):
        raise TrainDataError("the training data has no conversations in train/")
    # Mixing by weight: keep each dataset's share at weight / total by down-sampling the over-represented ones.
    density = [source.weight / n if n else 0.0 for source, n in zip(data, counts)]
    fractions = [d / max(density) for d in density]
    stats: dict[str, Any] = {"datasets": []}
    packed = {}
    packer = PackRows(seq_len, pad_id, spec.train.packing)
    for split, parts in samples.items():
        rows = []
        for domain, ds in enumerate(parts):
            usable = ds.filter(expr=_col("supervised") > 0)
            skipped = ds.count() - usable.count()  # ds is materialized: both counts are cheap
            if split == "train" and fractions[domain] < 1.0:
                usable = usable.random_sample(fractions[domain], seed=spec.train.seed)
            if split == "val":  # every dataset gets its own share of each evaluation (per-source val loss)
                usable = usable.limit(spec.train.eval_batches * spec.train.batch_size)
            # Packed per dataset, so a row never mixes sources and its domain label is exact.
            rows.append(usable.map_batches(packer, batch_format="pyarrow", batch_size=1024))
            if split == "train":
                stats["datasets"].append(
                    {
                        "path": data_dirs[domain],
                        "weight": data[domain].weight,
                        "tag": data[domain].tag,
                        "conversations": counts[domain],
                        "skipped_no_supervised_tokens": skipped,
                        "sampled_fraction": round(fractions[domain], 6),
                    }
                )
        packed[split] = (rows[0].union(*rows[1:]) if len(rows) > 1 else rows[0]).materialize()
    n_rows = packed["train"].count()
    if n_rows == 0 or packed["val"].count() == 0:
        raise TrainDataError("after tokenization there is no train or no val row (are the conversations empty?)")
    tokens = packed["train"].sum("n_tokens")
    stats.update(
        train_rows=n_rows,
        val_rows=packed["val"].count(),
        train_tokens=int(tokens),
        packing_efficiency=round(tokens / (n_rows * seq_len), 4),
        skipped_no_supervised_tokens=sum(d["skipped_no_supervised_tokens"] for d in stats["datasets"]),
    )
    return packed["train"], packed["val"], stats


def _col(name: str):
    from ray.data.expressions import col

    return col(name)


# ---------------------------------------------------------------- the run


def presplit_data_config(train_ds, world_size: int):
    """A DataConfig that gives each worker its own pre-cut shard of the (materialized) train set.

    Ray Train's default streams the train set through ``streaming_split``: a coordinator actor runs the dataset and
    deals blocks to the workers as they ask. The packed train set is already materialized (fixed-length rows,
    small next to the model), so cutting it into equal shards once, in the driver before ``fit()`` while the
    CPUs are still free (inside ``fit()`` the workers hold them and a split's tasks would wait forever on a
    small node), removes that actor and its round trips from the training steps; each worker reads its shard's
    blocks straight from the object store. ``get_dataset_shard("train")`` works as before; val goes to every
    worker whole.
    """
    from ray.train import DataConfig

    class PresplitDataConfig(DataConfig):
        def __init__(self, shards) -> None:
            super().__init__(datasets_to_split=["train"])
            self.shards = shards

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if set(datasets) != {"train"} or world_size != len(self.shards):  # val; or a resized worker group
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            return [{"train": shard.iterator()} for shard in self.shards]

    return PresplitDataConfig(train_ds.split(world_size, equal=True))


def _added_token_ids(spec: Spec, tokenizer) -> list[int]:
    """Tokens the tokenizer added to a pretrained model's vocabulary (LoRA must train their embeddings)."""
    if spec.model.from_scratch:
        return []
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_path(spec.model.name_or_path)).vocab_size
    return sorted(i for i in tokenizer.get_added_vocab().values() if i >= vocab_size)


def export_dirs(checkpoint_dir: str, output: str, names: tuple[str, ...]) -> None:
    """OUTPUT/<name> := the checkpoint's <name> dir, for each name (an old one the checkpoint lacks is removed).

    Each is copied beside its target first and renamed into place only when every copy is complete, so a copy that
    fails (a full disk, say) leaves the previous export whole and no partial model behind.
    """
    run_id = uuid.uuid4().hex[:8]
    staged = {name: os.path.join(output, f".{name}.staging-{run_id}") for name in names}
    try:
        for name, staging in staged.items():
            if os.path.isdir(os.path.join(checkpoint_dir, name)):
                shutil.copytree(os.path.join(checkpoint_dir, name), staging)
        for name, staging in staged.items():
            target = os.path.join(output, name)
            if os.path.lexists(target):
                os.rename(target, f"{staging}.old")
            if os.path.isdir(staging):
                os.rename(staging, target)
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(f"{staging}.old", ignore_errors=True)


@dataclass
class PreparedData:
    """What every run on the same data shares: the tokenizer, and the tokenized, packed train and val datasets
    (materialized once; a search's trials all train on them)."""

    tokenizer: Any
    train: Any  # ray.data.Dataset
    val: Any
    stats: dict[str, Any]
    domains: list[str]
    data_dirs: list[str]


def prepare_training_data(spec: Spec, progress=None) -> PreparedData:
    """Tokenizer (trained for a scratch model, else the model's), then the tokenized, packed datasets."""
    say = progress or (lambda message: None)
    if not spec.train.data:
        raise TrainDataError("no training data: pass --data DIR (a curation output's data/) or set train.data")
    data_dirs = [resolve_data_dir(d.path) for d in spec.train.data]
    say("tokenizer")
    texts = _training_texts(data_dirs) if spec.model.from_scratch else None
    tokenizer = load_tokenizer(spec.model, texts)
    say("tokenizing and packing")
    train_ds, val_ds, data_stats = prepare_datasets(spec, spec.train.data, data_dirs, tokenizer)
    domains = [d.tag or Path(p).parent.name or f"data{i}" for i, (d, p) in enumerate(zip(spec.train.data, data_dirs))]
    return PreparedData(tokenizer, train_ds, val_ds, data_stats, domains, data_dirs)


def build_trainer(spec: Spec, prepared: PreparedData, run_config, fault_at_step: int | None = None):
    """The Ray Train `TorchTrainer` of ``spec`` on ``prepared`` data: what `chatforge train` fits, and each trial of
    `chatforge tune`. ``run_config`` names where checkpoints go and the callbacks; its failure config is the spec's."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = spec.scaling
    run_config = dataclasses.replace(run_config, failure_config=FailureConfig(max_failures=scaling.max_failures))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": resolved(spec),
            "tokenizer": prepared.tokenizer,
            "domains": prepared.domains,
            "trainable_token_ids": _added_token_ids(spec, prepared.tokenizer),
            "fault_at_step": fault_at_step,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=run_config,
        datasets={"train": prepared.train, "val": prepared.val},
        dataset_config=presplit_data_config(prepared.train, scaling.num_workers),
    )


def run_training(spec: Spec, fault_at_step: int | None = None, progress=None, on_report=None) -> TrainingResult:
    """Train per ``spec`` into ``spec.train.output``; Ray must already be initialised.

    ``progress(message)`` hears each phase; ``on_report(metrics)`` each of rank 0's reports while training runs
    (step, loss, lr, tokens_per_s, eval_loss), in a driver thread. ``fault_at_step`` kills one worker process at
    that step on the first attempt (to exercise resume in tests).
    """
    import ray.data
    from ray.train import CheckpointConfig, RunConfig

    say = progress or (lambda message: None)
    started = time.perf_counter()
    if not spec.train.data:
        raise TrainDataError("no training data: pass --data DIR (a curation output's data/) or set train.data")
    output = os.path.abspath(spec.train.output)
    checkpoints = os.path.join(output, "checkpoints")
    if not spec.train.resume:
        # Ray Train restores a run found at its storage path; a new run must not silently continue an old one.
        shutil.rmtree(checkpoints, ignore_errors=True)
    os.makedirs(output, exist_ok=True)
    prepared = prepare_training_data(spec, progress=say)
    data_dirs, data_stats = prepared.data_dirs, prepared.stats

    with follow_reports(on_report) as callbacks:
        run_config = RunConfig(
            name="train",
            storage_path=checkpoints,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=callbacks,
        )
        trainer = build_trainer(spec, prepared, run_config, fault_at_step=fault_at_step)
        say(f"training on {spec.scaling.num_workers} workers (ZeRO-{spec.deepspeed.zero_stage}, {spec.method})")
        context = ray.data.DataContext.get_current()
        bars, context.enable_progress_bars = context.enable_progress_bars, False  # workers' data bars are noise in logs
        try:
            result = trainer.fit()
        finally:
            context.enable_progress_bars = bars
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")

    with result.checkpoint.as_directory() as directory:
        export_dirs(directory, output, (MODEL_DIR, ADAPTER_DIR))
        shutil.copyfile(os.path.join(directory, METRICS_FILE), os.path.join(output, METRICS_FILE))
    fingerprints = [data_fingerprint(d) for d in data_dirs]
    summary = {
        "model_dir": os.path.join(output, MODEL_DIR),
        "final_metrics": result.metrics,
        "data": data_stats,
        "fingerprint": _combined_fingerprint(fingerprints),
        "data_fingerprints": fingerprints,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "config": resolved(spec),
        "chatforge_version": chatforge.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with open(os.path.join(output, "training.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return TrainingResult(output=output, summary=summary)
