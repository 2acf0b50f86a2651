"""The path users run, on the embedded SmolLM2-135M-Instruct: load pretrained -> LoRA fine-tune with Ray Train and
DeepSpeed -> export -> serve, through the CLI with the quickstart spec (shortened to a few steps)."""

import json
import sqlite3
import subprocess
import sys

import pytest
from test_cli_curate import ENV, chatforge

from helpers.network import free_port
from helpers.train_data import write_curated

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_fine_tunes_exports_and_serves_smollm2(tmp_path):
    data = write_curated(tmp_path / "curated", n_train=24, n_val=8)
    out = tmp_path / "run"
    short = [
        "ray.num_cpus=2",
        "model.max_length=128",
        "train.max_steps=3",
        "train.batch_size=1",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=1",
        "train.checkpoint_every=3",
    ]
    result = chatforge(
        "train", "pipelines/quickstart.yaml", "--data", str(data), "--output", str(out), *short, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["model"]["name_or_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert summary["config"]["method"] == "lora"
    model = out / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152  # merged LoRA, no added tokens
    assert (model / "model.safetensors").is_file() and (out / "adapter").is_dir()
    template = (
        json.loads((model / "tokenizer_config.json").read_text()).get("chat_template")
        or (model / "chat_template.jinja").read_text()
    )
    assert "<|im_start|>" in template

    feedback = tmp_path / "feedback.db"
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatforge.cli",
            "serve",
            "pipelines/quickstart.yaml",
            "--model",
            str(model),
            "--port",
            str(free_port()),
            "--check",
            f"serve.feedback.url=sqlite:///{feedback}",
            "serve.feedback.url_env=null",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    with sqlite3.connect(feedback) as db:
        [(answer, tokens)] = db.execute("SELECT answer, completion_tokens FROM completions").fetchall()
    words = answer.split()
    assert tokens > 3 and len(words) >= 3
    assert sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.7 * len(words)  # words, not fragments
