"""The GPU-cluster recipes, shortened to a few steps: run only where CUDA GPUs (and the model hub) are available."""

import pytest

from chatforge.config import load_spec
from chatforge.train.trainer import run_training
from helpers.train_data import write_curated

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("recipe", ["pipelines/finetune-zero2.yaml", "pipelines/finetune-zero3-lora.yaml"])
def test_recipe_runs_a_few_steps_on_gpus(tmp_path, recipe):
    import ray
    import torch

    gpus = torch.cuda.device_count()
    data = write_curated(tmp_path / "curated")
    spec = load_spec(
        recipe,
        [
            f"train.data=[{{path: '{data}'}}]",
            f"train.output={tmp_path / 'out'}",
            "ray.address=null",
            f"scaling.num_workers={gpus}",
            "scaling.cpus_per_worker=1",
            "train.max_steps=5",
            "train.eval_every=5",
            "train.checkpoint_every=5",
            "train.batch_size=1",
            "train.grad_accum=1",
            "train.eval_batches=1",
        ],
    )
    ray.init(num_gpus=gpus)
    try:
        result = run_training(spec)
    finally:
        ray.shutdown()
    assert result.summary["final_metrics"]["step"] == 5
    assert (tmp_path / "out" / "model" / "config.json").exists()
