"""`chatforge curate` as a user runs it: a real process, a local Ray, files in and out, exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def chatforge(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_curate_openai_jsonl_with_bad_lines(tmp_path):
    good = [
        {
            "id": f"g{i}",
            "messages": [
                {"role": "user", "content": f"question number {i} about gardens and rivers"},
                {"role": "assistant", "content": f"answer {i}: water the garden at dawn"},
            ],
        }
        for i in range(40)
    ]
    lines = [json.dumps(r) for r in good]
    lines.insert(10, '{"messages": [{"role": "user", "content": "unclosed"}')
    lines.insert(20, '{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}')
    lines.insert(30, "[1, 2, 3]")
    dump = tmp_path / "logs.jsonl"
    dump.write_text("\n".join(lines) + "\n" + '{"messages": [{"role": "user", "cont')
    out = tmp_path / "out"

    result = chatforge(
        "curate",
        "pipelines/curate.yaml",
        "--input",
        str(dump),
        "--output",
        str(out),
        "--json",
        "ray.num_cpus=1",  # one CPU: the scorer pool must leave room for the tasks around it
        "curate.dedup.near=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout.strip().splitlines()[-1])
    assert manifest["input_records"] == 44
    assert manifest["kept"] == 40
    assert manifest["dropped"] == {
        "malformed:invalid_json": 2,
        "malformed:unknown_role": 1,
        "malformed:not_an_object": 1,
    }
    assert "malformed:unknown_role" in result.stderr  # the summary table names the reasons
    assert (out / "manifest.json").exists() and list((out / "dropped").glob("*.parquet"))
    # the command's MLflow run: named in the manifest, with the counts, the manifest and the source as an input
    import mlflow

    run = mlflow.MlflowClient(ENV["MLFLOW_TRACKING_URI"]).get_run(manifest["tracking"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["chatforge.command"] == "curate"
    assert run.data.metrics["kept"] == 40 and run.data.metrics["dropped.malformed:invalid_json"] == 2
    assert run.data.tags["chatforge.data_fingerprint.output"] == manifest["fingerprint"]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["logs"]


def test_curate_bad_spec_key_is_a_clear_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("curate:\n  filter:\n    min_turns: 2\n")
    result = chatforge("curate", str(spec))
    assert result.returncode == 2
    assert "curate.filter: unknown key" in result.stderr and str(spec) in result.stderr


def test_curate_missing_input_is_a_clear_error(tmp_path):
    result = chatforge("curate", "pipelines/curate.yaml", "--input", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_a_sharegpt_file_named_jsonl_is_read_as_sharegpt_and_a_wrong_format_stops(tmp_path):
    """A `.jsonl` name says OpenAI; the records say ShareGPT. Without --format the records win (and the choice is
    said); a spec that names the wrong format stops before Ray starts instead of dropping every record."""
    records = [
        {"id": f"s{i}", "conversations": [{"from": "human", "value": f"question {i} about rivers and bridges"},
                                          {"from": "gpt", "value": f"answer {i}: bridges cross rivers"}]}
        for i in range(12)
    ]  # fmt: skip
    dump = tmp_path / "logs.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["pipelines/curate.yaml", "--output", str(tmp_path / "out"), "ray.num_cpus=1", "curate.dedup.near=false"]
    result = chatforge("curate", "--input", str(dump), "--json", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--input {dump}: read as sharegpt" in " ".join(result.stderr.split())
    assert json.loads(result.stdout.strip().splitlines()[-1])["kept"] == 12

    wrong = chatforge("curate", *common, f"curate.sources=[{{name: logs, format: openai, path: '{dump}'}}]")
    assert wrong.returncode == 2
    assert "set its format to sharegpt" in " ".join(wrong.stderr.split()) and "Started a local Ray" not in wrong.stderr
