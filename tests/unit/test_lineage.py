"""chatforge.lineage against files written with json.dump and a real MLflow SQLite store (nothing mocked)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import load_spec
from chatforge.lineage import LineageError, lineage_of, manifest_path
from chatforge.tracking import FINGERPRINT_TAG, command_run, register_model

KINDS = ("data", "curation", "training", "model", "eval")
FINGERPRINT = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def spec(tmp_path):
    return load_spec(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "name=test"])


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def curate(spec, tmp_path: Path) -> Path:
    """A curation output with its manifest, and its FINISHED curate run."""
    curation, raw = tmp_path / "curated", tmp_path / "raw.jsonl"
    (curation / "data").mkdir(parents=True)
    raw.write_text("{}\n")
    with command_run(spec, "curate", output=str(curation)) as run:
        run.dataset(str(raw), FINGERPRINT, name="raw", context="source")
        run.metrics({"input_records": 10, "kept": 8})
        run.tags({f"{FINGERPRINT_TAG}.output": FINGERPRINT})
    source = {"name": "raw", "format": "openai", "files": [str(raw)], "skipped": []}
    manifest = {"fingerprint": FINGERPRINT, "input_records": 10, "kept": 8, "sources": [source]}
    write_json(
        curation / "manifest.json", manifest | {"created_at": "2025-01-01T00:00:00+00:00", "tracking": run.record()}
    )
    return curation / "data"


def train(spec, tmp_path: Path, data: Path, tracked: bool = True) -> Path:
    """A training output (model/ and training.json) on ``data``, and its FINISHED train run."""
    output = tmp_path / "trained"
    (output / "model").mkdir(parents=True, exist_ok=True)
    with command_run(spec, "train", output=str(output)) as run:
        run.dataset(str(data), FINGERPRINT, name="chat", context="training.chat")
        run.tags({f"{FINGERPRINT_TAG}.training": FINGERPRINT})
        run.metrics({"final.eval_loss": 1.5, "final.step": 20})
    config = spec.model_dump(mode="json")
    config["train"]["data"] = [{"path": str(data), "weight": 1.0, "tag": None}]
    training = {
        "model_dir": str(output / "model"),
        "fingerprint": FINGERPRINT,
        "data_fingerprints": [FINGERPRINT],
        "config": config,
        "final_metrics": {"eval_loss": 1.5, "step": 20},
        "created_at": "2025-01-01T00:00:00+00:00",
        "tracking": run.record() if tracked else None,
    }
    write_json(output / "training.json", training)
    return output / "model"


def evaluate(spec, tmp_path: Path, model: Path, measured: Path | None = None) -> Path:
    """An eval output of ``model`` that passed its gate, its eval run, and the registered version."""
    output = tmp_path / "evaluated"
    output.mkdir()
    with command_run(spec, "eval", output=str(output)) as run:
        run.tags({"chatforge.model_dir": str(model.resolve())})
        run.metrics({"perplexity": 12.5, "toxicity_rate": 0.0})
        register_model(run, str(model), "chatforge-test")
    result = {"model_dir": str((measured or model).resolve()), "perplexity": 12.5, "toxicity_rate": 0.0}
    gate = {"passed": True, "reasons": []}
    write_json(output / "eval.json", result | {"gate": gate, "created_at": "2025-01-01", "tracking": run.record()})
    return output


def run_ids(links) -> dict[str, list[str | None]]:
    return {kind: [link.run_id for link in links if link.kind == kind] for kind in KINDS}


def test_a_full_chain_is_the_same_from_the_files_and_from_mlflow(spec, tmp_path):
    model = train(spec, tmp_path, curate(spec, tmp_path))
    found = lineage_of(str(model), [str(evaluate(spec, tmp_path, model))])
    ids = run_ids(found.links)
    assert ids == run_ids(found.mlflow_links)
    assert all(ids[kind] == [None] for kind in ("data", "model"))
    assert all(len(ids[kind]) == 1 and ids[kind][0] for kind in ("curation", "training", "eval"))
    assert found.disagreements == [] and found.mlflow_note is None
    by_kind = {link.kind: link for link in found.mlflow_links}
    assert by_kind["curation"].details["kept"] == 8 and by_kind["curation"].path == str(tmp_path / "curated")
    assert by_kind["data"].path == str(tmp_path / "raw.jsonl")
    assert by_kind["model"].details["eval_loss"] == 1.5
    assert by_kind["eval"].details["registered"] == ["chatforge-test v1 @candidate"]
    assert {link.kind: link for link in found.links}["eval"].details["gate"] == "PASS"


def test_a_newer_train_run_for_the_same_output_is_a_disagreement(spec, tmp_path):
    model = train(spec, tmp_path, curate(spec, tmp_path))
    named = json.loads((model.parent / "training.json").read_text())["tracking"]["run_id"]
    time.sleep(0.01)  # MLflow orders runs by start time in milliseconds
    with command_run(spec, "train", output=str(model.parent)) as newer:
        newer.tags({f"{FINGERPRINT_TAG}.training": FINGERPRINT})
    found = lineage_of(str(model))
    assert found.disagreements == [
        f"training run: training.json names {named}, MLflow's newest train run for {model.parent} is {newer.run_id}"
    ]


def test_a_newer_curate_run_of_the_same_data_is_a_disagreement(spec, tmp_path):
    data = curate(spec, tmp_path)
    named = json.loads((data.parent / "manifest.json").read_text())["tracking"]["run_id"]
    model = train(spec, tmp_path, data)
    time.sleep(0.01)
    with command_run(spec, "curate", output=str(data.parent)) as newer:
        newer.tags({f"{FINGERPRINT_TAG}.output": FINGERPRINT})
    [disagreement] = lineage_of(str(model)).disagreements
    assert disagreement.startswith(f"curation run: {data.parent}/manifest.json names {named}")
    assert disagreement.endswith(f"that wrote {FINGERPRINT} is {newer.run_id}")


def test_the_files_own_contradictions_are_disagreements(spec, tmp_path):
    data = curate(spec, tmp_path)
    model = train(spec, tmp_path, data)
    manifest = json.loads((data.parent / "manifest.json").read_text())
    write_json(data.parent / "manifest.json", manifest | {"fingerprint": "f" * 32})
    elsewhere = tmp_path / "other" / "model"
    found = lineage_of(str(model), [str(evaluate(spec, tmp_path, model, measured=elsewhere))])
    assert found.disagreements[0].startswith(f"data: {data.parent / 'manifest.json'} has fingerprint {'f' * 32}")
    assert f"eval.json measured {elsewhere}, not {model}" in found.disagreements[1]


def test_a_dir_without_training_json_is_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(LineageError, match="not a chatforge training output: no training.json beside it"):
        lineage_of(str(tmp_path / "model"))
    result = CliRunner().invoke(app, ["lineage", str(tmp_path / "model")])
    assert result.exit_code == 2 and "no training.json beside it" in result.stderr


def test_with_tracking_off_the_files_answer_alone(spec, tmp_path):
    model = train(spec, tmp_path, tmp_path / "raw-data", tracked=False)
    found = lineage_of(str(model))
    assert found.mlflow_links is None and found.mlflow_note == "training.json names no MLflow run (tracking was off)"
    assert [(link.kind, link.label) for link in found.links][0] == ("data", "uncurated data (no manifest.json)")
    assert [link.kind for link in found.links] == ["data", "training", "model"]


def test_an_unreachable_store_leaves_the_files_answer(spec, tmp_path):
    model = train(spec, tmp_path, curate(spec, tmp_path))
    training = json.loads((model.parent / "training.json").read_text())
    training["tracking"]["uri"] = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
    write_json(model.parent / "training.json", training)
    found = lineage_of(str(model))
    assert found.mlflow_links is None and "cannot be reached" in found.mlflow_note
    assert not (tmp_path / "gone").exists()


def test_the_manifest_is_found_where_training_finds_it(tmp_path):
    from chatforge.train.data import resolve_data_dir

    for split in ("train", "val"):
        (tmp_path / "curated" / "data" / split).mkdir(parents=True)
    (tmp_path / "curated" / "manifest.json").write_text("{}")
    for given in ("curated", "curated/data"):
        path = str(tmp_path / given)
        assert manifest_path(path) == str(Path(resolve_data_dir(path)).parent / "manifest.json")


def test_the_command_prints_each_kind_and_json(spec, tmp_path):
    model = train(spec, tmp_path, curate(spec, tmp_path))
    evaluated = evaluate(spec, tmp_path, model)
    result = CliRunner().invoke(app, ["lineage", str(model), "--eval", str(evaluated), "--json"])
    assert result.exit_code == 0, result.output
    for kind in KINDS:
        assert result.stderr.count(f"── {kind}") == 2  # the files' tree and MLflow's
    printed_text = " ".join(result.stderr.split())  # rich wraps long lines at the runner's 80 columns
    assert "the files and MLflow agree" in printed_text and "registered chatforge-test v1 @candidate" in printed_text
    printed = json.loads(result.stdout)
    assert printed["model_dir"] == str(model.resolve()) and printed["disagreements"] == []
    assert [link["kind"] for link in printed["links"]] == list(KINDS)


def test_a_cycles_candidate_links_to_its_canary_deployment_and_its_promotion(tmp_path):
    from chatforge.lineage import deployment_links

    first, second = tmp_path / "loop" / "cycle-0001", tmp_path / "loop" / "cycle-0002"
    (first / "train").mkdir(parents=True)
    second.mkdir(parents=True)
    deployment = {
        "action": "deploy",
        "app": "chatforge",
        "canary": "candidate-0001",
        "weights": {"candidate-0001": 0.1},
    }
    write_json(first / "cycle.json", {"cycle": 1, "deployment": deployment})
    decision = {"action": "promote", "app": "chatforge", "canary": "candidate-0001", "reason": "significantly better"}
    write_json(second / "cycle.json", {"cycle": 2, "canary": decision, "deployment": None})
    deployed, promoted = deployment_links(str(first / "train"))
    assert deployed.label == "canary candidate-0001 on chatforge" and deployed.details["cycle"] == 1
    assert promoted.label == "promoted: candidate-0001" and promoted.details["cycle"] == 2
    write_json(second / "cycle.json", {"cycle": 2, "eval": {"gate": {"passed": False}}, "deployment": None})
    (gated,) = deployment_links(str(second / "train"))
    assert gated.label == "not deployed (the gate failed)"
    assert deployment_links(str(tmp_path / "elsewhere" / "train")) == []  # not a cycle's training output
