"""What each Ray Train worker runs: `train_loop_per_worker`, a thin adapter between Ray Train and `run_steps`.

It builds the engine from Ray Train's context (rank, world size), resumes from ``ray.train.get_checkpoint()`` when
there is one, reads its micro-batches from its dataset shards, and runs the plain loop with `TrainReports`, which
sends rank 0's rows and the checkpoints through ``ray.train.report``. The run ends in a final checkpoint that carries
the exported Hugging Face model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from chatforge.config import Spec
from chatforge.train.engine import TrainEngine, build_engine, export_model, init_distributed
from chatforge.train.loop import LoopState, load_checkpoint, micro_batches, run_steps, save_checkpoint
from chatforge.train.metrics import Loggers, MetricsHistory, RayMetrics, metrics_run_name


class TrainReports:
    """Each step's rows as one ``ray.train.report``, with a checkpoint when one is due.

    As a `MetricsLogger` it gathers the rows of the current step (a log row and an eval row share a report); as a
    `StepCallback` it sends them. A checkpoint holds every rank's DeepSpeed shards and rank 0's metrics.jsonl; each
    rank writes its part into a local temporary directory and Ray merges the ranks' directories into one checkpoint.
    """

    def __init__(self, engine: TrainEngine, history: MetricsHistory, lora: bool) -> None:
        self.engine, self.history, self.lora = engine, history, lora
        self.pending: dict[str, Any] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.pending = {"step": step, **self.pending, **metrics}

    def after_step(self, state: LoopState, checkpoint: bool) -> None:
        import ray.train

        metrics, self.pending = self.pending, {}
        if checkpoint:
            self.report_checkpoint(state, metrics or {"step": state.step})
        elif metrics:
            ray.train.report(metrics)

    def report_checkpoint(
        self,
        state: LoopState,
        metrics: dict[str, Any],
        export: Callable[[str], None] | None = None,
        with_best_weights: bool = True,
    ) -> None:
        """Report ``metrics`` with a checkpoint of the run as it is; ``export(directory)`` adds to it first."""
        import ray.train

        directory = tempfile.mkdtemp(prefix=f"chatforge-ckpt-r{self.engine.rank}-")
        try:
            save_checkpoint(self.engine, state, directory, lora=self.lora, with_best_weights=with_best_weights)
            if self.engine.rank == 0:
                self.history.write(directory)
            if export is not None:
                export(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def final_metrics(engine: TrainEngine, state: LoopState, history: MetricsHistory) -> dict[str, Any]:
    """The last report: the last log and eval rows, how the run ended, and which step's weights are exported (the
    best evaluation's when early stopping kept a copy of them, as training went past them)."""
    return {
        **history.last("loss"),
        **history.last("eval_loss"),
        "step": state.step,
        "stopped_early": state.stopped_early,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "exported_step": state.best_step if state.best_weights is not None else state.step,
        "trainable_params": engine.trainable_params,
        "total_params": engine.total_params,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``config``: the resolved ``spec``, the ``tokenizer``, the ``domains`` (a name per dataset), the
    ``trainable_token_ids`` (LoRA), ``step_callbacks`` (`StepCallback`s, called before each step's report) and
    ``tracked`` (the command's MLflow run, or None)."""
    import ray.data
    import ray.train

    spec = Spec.model_validate(config["spec"])
    tokenizer, settings = config["tokenizer"], spec.train
    # the driver shows training progress; Ray Data's bars for each worker's shard reads would only interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False
    context = ray.train.get_context()
    init_distributed(spec.scaling.use_gpu)
    if not spec.scaling.use_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    engine = build_engine(
        spec, tokenizer, context.get_world_rank(), context.get_world_size(), config.get("trainable_token_ids", ())
    )

    state, history = LoopState(), MetricsHistory()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, history = load_checkpoint(engine, directory), MetricsHistory.read(directory)
        history.log(state.step, {"event": "resumed"})

    # The val set was cut to eval_batches per dataset when it was prepared: hold it, the same batches every eval.
    val_batches = list(
        ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=settings.batch_size, dtypes=torch.long)
    )
    shard = ray.train.get_dataset_shard("train")
    batches = micro_batches(
        lambda: shard.iter_torch_batches(batch_size=settings.batch_size, drop_last=True, dtypes=torch.long),
        state,
        settings.batch_size,
    )
    reports = TrainReports(engine, history, lora=spec.method == "lora")
    callbacks = [*config.get("step_callbacks", ()), reports]
    loggers = [history, reports]
    if engine.rank == 0:  # rank 0's rows also go to Ray's metrics and the command's MLflow run
        loggers.append(RayMetrics(metrics_run_name(spec.train.output), state.step))
        if config.get("tracked") is not None:
            from chatforge.tracking import RunMetrics

            loggers.append(RunMetrics(config["tracked"]))
    run_steps(engine, batches, state, settings, val_batches, Loggers(*loggers), callbacks, config["domains"])

    reports.report_checkpoint(
        state,
        final_metrics(engine, state, history),
        export=partial(export_model, engine, spec, tokenizer, state.best_weights),
        with_best_weights=False,
    )
