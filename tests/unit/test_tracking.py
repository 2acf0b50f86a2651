"""chatforge.tracking against a real MLflow SQLite store (nothing external starts)."""

from __future__ import annotations

import mlflow
import pytest

from chatforge.config import load_spec
from chatforge.tracking import FINGERPRINT_TAG, command_run, flatten, register_model, tracking_uri


@pytest.fixture
def spec(tmp_path):
    return load_spec(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "name=test"])


def test_flatten_gives_dotted_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "null",
        "e": "{}",
    }


def test_the_uri_comes_from_the_spec_then_the_env_then_runs(monkeypatch, spec, tmp_path):
    assert tracking_uri(spec.tracking) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    plain = load_spec(None, [])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(plain.tracking) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(plain.tracking).endswith("/runs/mlflow.db")


def test_a_command_run_holds_the_spec_metrics_artifacts_and_data(spec, tmp_path):
    data = tmp_path / "curated" / "data"
    data.mkdir(parents=True)
    (tmp_path / "out.json").write_text("{}")
    with command_run(spec, "train", output=str(tmp_path / "out")) as run:
        run.metrics({"loss": 2.5, "note": "text", "flag": True}, step=3)
        run.metrics({"loss": 2.0}, step=6)
        run.artifact(str(tmp_path / "out.json"))
        run.dataset(str(data), "fp-123", name="curated", context="training")
    client = mlflow.MlflowClient(spec.tracking.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == str(spec.train.lr) and got.data.params["name"] == "test"
    assert got.data.tags["chatforge.command"] == "train" and got.data.tags[f"{FINGERPRINT_TAG}.training"] == "fp-123"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.5, 2.0]
    assert "note" not in got.data.metrics and "flag" not in got.data.metrics
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"spec.yaml", "out.json"}
    [data_input] = got.inputs.dataset_inputs
    assert data_input.dataset.digest == "fp-123" and data_input.tags[0].value == "training"


def test_a_failing_command_ends_its_run_failed_and_nests_under_a_parent(spec):
    with (
        command_run(spec, "tune") as parent,
        pytest.raises(RuntimeError),
        command_run(spec, "trial", parent=parent) as trial,
    ):
        raise RuntimeError("boom")
    client = mlflow.MlflowClient(spec.tracking.uri)
    assert client.get_run(trial.run_id).info.status == "FAILED"
    assert client.get_run(trial.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_a_registered_model_gets_the_candidate_alias(spec, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with command_run(spec, "eval") as run:
        version = register_model(run, str(model), "chatforge-test")
    client = mlflow.MlflowClient(spec.tracking.uri)
    assert client.get_model_version_by_alias("chatforge-test", "candidate").version == version


def test_tracking_off_is_a_no_op(tmp_path):
    spec = load_spec(None, ["tracking.enabled=false"])
    with command_run(spec, "curate") as run:
        run.metrics({"x": 1.0})
        run.dataset(str(tmp_path), "fp", name="d", context="training")
    assert run.record() is None and not (tmp_path / "mlflow.db").exists()
