"""`chatforge train` as a user runs it: a real process with its own local Ray."""

import json

import pytest
from test_cli_curate import ENV, chatforge

from helpers.train_data import TINY_TRAINING, write_curated

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_train_command_end_to_end(tmp_path):
    data = write_curated(tmp_path / "curated")
    out = tmp_path / "run"
    result = chatforge(
        "train",
        "pipelines/quickstart.yaml",
        "--data",
        f"{data}:1:chat",
        "--output",
        str(out),
        *TINY_TRAINING,
        "train.max_steps=6",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packing efficiency" in result.stderr and str(out / "model") in result.stderr
    # the live bar's last state: rank 0's reports reached the driver while fit() ran
    assert "6/6" in result.stderr and "tok/s" in result.stderr and "val " in result.stderr
    assert "row/s]" not in result.stderr  # no Ray Data progress bars, from the driver or the workers
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["train"]["data"] == [{"path": str(data), "weight": 1.0, "tag": "chat"}]
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") >= 3
    # the model card: its figures are training.json's and the curation manifest's
    card = (out / "model" / "README.md").read_text()
    final = summary["final_metrics"]
    assert f"| step | {final['step']} |" in card and f"| loss | {final['loss']:.4g} |" in card
    assert f"| `{data}` | 1 | chat |" in card and f"`{summary['fingerprint']}`" in card
    # the command's MLflow run: rank 0 logged each step's loss as it trained; the data is an input by fingerprint
    import mlflow

    client = mlflow.MlflowClient(ENV["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["tracking"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["chatforge.command"] == "train"
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == {row["step"] for row in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in row}
    assert run.data.metrics["final.step"] == 6
    [data_input] = run.inputs.dataset_inputs
    assert data_input.dataset.name == "chat" and data_input.dataset.digest == summary["fingerprint"][:36]


def test_train_without_val_split_is_a_clear_error(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    result = chatforge("train", "pipelines/quickstart.yaml", "--data", str(tmp_path / "data"), "ray.num_cpus=1")
    assert result.returncode == 2
    assert "no val/ split" in result.stderr


@pytest.mark.slow
def test_a_diverging_run_fails_with_one_clear_line_and_no_model(tmp_path):
    data = write_curated(tmp_path / "curated")
    out = tmp_path / "run"
    overrides = [*TINY_TRAINING, "train.max_steps=6", "train.lr=1e30", "scaling.max_failures=0"]
    result = chatforge("train", "pipelines/quickstart.yaml", "--data", str(data), "--output", str(out), *overrides)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "training failed" in line and "NonFiniteLossError" in line and "Lower train.lr" in line
    assert not (out / "model").exists() and not (out / "training.json").exists()
