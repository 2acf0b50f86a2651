"""`chatforge train`: curated data -> tokenized, packed Ray Datasets -> a Ray Train `TorchTrainer` -> OUTPUT/.

The data is prepared by `chatforge.train.data`, each worker runs `chatforge.train.worker`; this module wires them
together, fits, and writes OUTPUT from the final checkpoint.

OUTPUT/model/          Hugging Face model dir (safetensors, config, tokenizer with its chat template)
OUTPUT/adapter/        LoRA runs: the adapter alone
OUTPUT/checkpoints/    Ray Train checkpoints (DeepSpeed shards of every rank); train.storage puts them elsewhere
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import chatforge
from chatforge import storage as paths
from chatforge.cards import training_card, write_card
from chatforge.config import Spec, resolved
from chatforge.files import write_atomic
from chatforge.train.data import (
    PreparedData,
    TrainDataError,
    combined_fingerprint,
    data_fingerprint,
    prepare_training_data,
)
from chatforge.train.engine import ADAPTER_DIR, MODEL_DIR
from chatforge.train.loop import StepCallback
from chatforge.train.metrics import METRICS_FILE
from chatforge.train.pretrained import model_path
from chatforge.train.progress import follow_reports
from chatforge.train.worker import train_loop_per_worker

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from chatforge.tracking import TrackedRun


@dataclass
class TrainingResult:
    output: str
    summary: dict[str, Any]


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
    fails (a full disk, say) leaves the previous export whole and no partial model behind; a rename that fails puts
    the previous exports back.
    """
    run_id = uuid.uuid4().hex[:8]
    staged = {name: os.path.join(output, f".{name}.staging-{run_id}") for name in names}
    try:
        for name, staging in staged.items():
            if os.path.isdir(os.path.join(checkpoint_dir, name)):
                shutil.copytree(os.path.join(checkpoint_dir, name), staging)
        swapped: list[tuple[str, str]] = []  # (target, its previous dir or "") in the order they were swapped
        try:
            for name, staging in staged.items():
                target = os.path.join(output, name)
                previous = ""
                if os.path.lexists(target):
                    os.rename(target, previous := f"{staging}.old")
                swapped.append((target, previous))
                if os.path.isdir(staging):
                    os.rename(staging, target)
        except BaseException:  # put every previous export back before the staging dirs go
            for target, previous in reversed(swapped):
                if previous and os.path.lexists(previous):
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(previous, target)
            raise
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(f"{staging}.old", ignore_errors=True)


def build_trainer(
    spec: Spec,
    prepared: PreparedData,
    run_config,
    step_callbacks: Sequence[StepCallback] = (),
    data_config=None,
    tracked: TrackedRun | None = None,
) -> TorchTrainer:
    """The Ray Train `TorchTrainer` of ``spec`` on ``prepared`` data: what `chatforge train` fits, and each trial of
    `chatforge tune`. ``run_config`` names where checkpoints go and the callbacks; its failure config is the spec's.
    ``step_callbacks`` run in every worker's loop after each step (`chatforge.train.loop.StepCallback`).
    ``data_config``: the train set's shards, cut before (`presplit_data_config`); cut here when None, which needs
    free CPUs for the split's tasks (so a Tune trial, whose neighbours hold the CPUs, gets them cut in the driver).
    ``tracked``: the command's MLflow run, to which rank 0 logs each metrics row as it trains."""
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
            "step_callbacks": list(step_callbacks),
            "tracked": tracked if tracked is not None and tracked.enabled else None,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=run_config,
        datasets={"train": prepared.train, "val": prepared.val},
        dataset_config=data_config or presplit_data_config(prepared.train, scaling.num_workers),
    )


class RunExistsError(ValueError):
    """OUTPUT holds an earlier run's checkpoints, and the spec neither resumes nor overwrites it."""


def checkpoint_storage(storage: str | None, output: str) -> tuple[str, str]:
    """(Ray Train's storage path, the run's name in it): OUTPUT/checkpoints and ``train`` by default; in a storage
    that runs share (``train.storage``), a name of this OUTPUT's own, the same each time, so ``train.resume`` finds
    it and two runs never share one."""
    if storage is None:
        return os.path.join(output, "checkpoints"), "train"
    digest = hashlib.blake2b(output.encode(), digest_size=4).hexdigest()
    return storage, f"{os.path.basename(output) or 'train'}-{digest}"


def remove_run(storage: str, run_name: str) -> None:
    """Delete a run's checkpoints from a local directory or an object store (nothing there: nothing to do)."""
    run = paths.join(storage, run_name)
    if paths.isdir(run):
        filesystem, path = paths.filesystem(run)
        filesystem.delete_dir(path)


def run_training(
    spec: Spec,
    progress=None,
    on_report=None,
    step_callbacks: Sequence[StepCallback] = (),
    tracked: TrackedRun | None = None,
) -> TrainingResult:
    """Train per ``spec`` into ``spec.train.output``; Ray must already be initialised.

    ``progress(message)`` hears each phase; ``on_report(metrics)`` each of rank 0's reports while training runs
    (step, loss, lr, tokens_per_s, eval_loss), in a driver thread. ``step_callbacks``: see `build_trainer`.
    ``tracked``: the command's MLflow run; it gets the metrics per step, and training.json names it.
    """
    import ray.data
    from ray.train import CheckpointConfig, RunConfig

    say = progress or (lambda message: None)
    started = time.perf_counter()
    if not spec.train.data:
        raise TrainDataError("no training data: pass --data DIR (a curation output's data/) or set train.data")
    output = os.path.abspath(spec.train.output)
    storage, run_name = checkpoint_storage(spec.train.storage, output)
    if not spec.train.resume and paths.isdir(paths.join(storage, run_name)):
        # Ray Train restores a run found at its storage path: a new run must neither silently continue an old one nor
        # silently delete its checkpoints
        if not spec.train.overwrite:
            raise RunExistsError(
                f"{output} holds an earlier run's checkpoints ({paths.join(storage, run_name)}): pass --overwrite "
                "(train.overwrite=true) to start afresh and delete them, train.resume=true to continue that run, or "
                "another --output"
            )
        remove_run(storage, run_name)
    os.makedirs(output, exist_ok=True)
    prepared = prepare_training_data(spec, progress=say)
    phases = {"prepare_s": time.perf_counter() - started}

    with follow_reports(on_report) as callbacks:
        run_config = RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            callbacks=callbacks,
        )
        trainer = build_trainer(spec, prepared, run_config, step_callbacks, tracked=tracked)
        say(f"training on {spec.scaling.num_workers} workers (ZeRO-{spec.deepspeed.zero_stage}, {spec.method})")
        context = ray.data.DataContext.get_current()
        bars, context.enable_progress_bars = context.enable_progress_bars, False  # workers' data bars are noise in logs
        try:
            fit_started = time.perf_counter()
            result = trainer.fit()
            phases["fit_s"] = time.perf_counter() - fit_started
        finally:
            context.enable_progress_bars = bars
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")

    export_started = time.perf_counter()
    with result.checkpoint.as_directory() as directory:
        export_dirs(directory, output, (MODEL_DIR, ADAPTER_DIR))
        shutil.copyfile(os.path.join(directory, METRICS_FILE), os.path.join(output, METRICS_FILE))
    fingerprints = [data_fingerprint(d) for d in prepared.data_dirs]
    summary = {
        "model_dir": os.path.join(output, MODEL_DIR),
        "model_uri": spec.train.model_uri,
        "final_metrics": result.metrics,
        "data": prepared.stats,
        "fingerprint": combined_fingerprint(fingerprints),
        "data_fingerprints": fingerprints,
        "wall_seconds": round(time.perf_counter() - started, 3),
        # where the wall time went: tokenizer and data preparation, Ray Train's fit (worker start, the steps, the
        # final checkpoint), the copy of the exported model into OUTPUT (not the copy to train.model_uri)
        "phases": {
            **{name: round(seconds, 3) for name, seconds in phases.items()},
            "export_s": round(time.perf_counter() - export_started, 3),
        },
        "tracking": tracked.record() if tracked is not None else None,
        "config": resolved(spec),
        "chatforge_version": chatforge.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_card(summary["model_dir"], training_card(spec, summary))
    if spec.train.model_uri:  # the card goes with the model
        say(f"copying the model to {spec.train.model_uri}")
        for name in (MODEL_DIR, ADAPTER_DIR):
            if os.path.isdir(os.path.join(output, name)):
                target = spec.train.model_uri if name == MODEL_DIR else paths.join(spec.train.model_uri, name)
                paths.copy_dir(os.path.join(output, name), target)
    write_atomic(os.path.join(output, "training.json"), json.dumps(summary, indent=2))
    return TrainingResult(output=output, summary=summary)
